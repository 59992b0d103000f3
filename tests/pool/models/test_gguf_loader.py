"""GGUF loading: SmolLM2-135M-Instruct's config, weights, q/k layout and tokenizer, checked
against Hugging Face transformers' own GGUF support; plus small synthetic files for the edges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

from helixflow.errors import ModelLoadError
from helixflow.pool.models.gguf_loader import unpermute_rope_rows
from helixflow.pool.models.loader import LoadedModel, load_model_files

# Strings whose token ids must equal transformers': words, whitespace runs, digits (SmolLM
# splits every digit), unicode of several scripts, emoji, code, and special tokens in text.
TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "12345 + 678 = 13023, pi = 3.14159",
    "naïve café — déjà vu, Straße, Ελληνικά, русский",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and ZWJ 👩‍💻",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't won't I'll they're",
    "<file_sep>print('a')<|endoftext|>",
    "",
]


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (rotate-half -> interleaved)."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


@pytest.fixture(scope="session")
def smollm_reader(smollm_path: Path) -> GGUFReader:
    return GGUFReader(smollm_path)


@pytest.fixture(scope="session")
def smollm_weights(smollm: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(smollm.weights())


def raw_gguf_tensor(reader: GGUFReader, name: str) -> torch.Tensor:
    """A tensor exactly as stored (dequantized, in llama.cpp's row order)."""
    tensor = next(t for t in reader.tensors if t.name == name)
    array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(array).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def test_config(smollm: LoadedModel) -> None:
    config = smollm.config
    assert smollm.format == "gguf"
    assert config.architecture == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.max_position_embeddings == 8192
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,) and config.pad_token_id == 2
    assert not config.attention_bias


def test_weight_names_and_shapes(
    smollm: LoadedModel, smollm_weights: dict[str, torch.Tensor]
) -> None:
    hidden, ffn, kv = 576, 1536, 3 * 64
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    expected = {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,)}
    for layer in range(30):
        expected |= {f"model.layers.{layer}.{k}": v for k, v in per_layer.items()}
    shapes = {name: tuple(w.shape) for name, w in smollm_weights.items()}
    assert shapes == expected  # tied embeddings: no lm_head.weight
    assert set(smollm.weight_names) == set(expected)
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in smollm_weights.values())
    assert torch.isfinite(smollm_weights["model.layers.0.self_attn.q_proj.weight"]).all()


def test_weights_are_yielded_lazily(smollm: LoadedModel) -> None:
    weights = smollm.weights()
    name, tensor = next(weights)
    assert name == smollm.weight_names[0] and tensor.numel() > 0
    weights.close()


def test_unpermute_inverts_llama_cpp() -> None:
    weight = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6 * 8, 5)
    for heads in (1, 2, 6):
        assert torch.equal(unpermute_rope_rows(llama_cpp_permute(weight, heads), heads), weight)
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(bias, 2), 2), bias)


@pytest.mark.slow
def test_every_weight_matches_transformers_gguf_loading(
    smollm_path: Path,
    smollm_reader: GGUFReader,
    smollm_weights: dict[str, torch.Tensor],
    transformers_offline: Any,
) -> None:
    """Every tensor, q/k un-permutation included, equals what transformers loads from the file.

    NOTE: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` also needs `accelerate`,
    which is not a test dependency. For llama files it builds the model, then takes its state
    dict from `load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)`, which
    dequantizes with gguf and un-permutes q/k with its own code; this test makes that same call
    with the model on the meta device (no memory, no init).
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # the model only tells load_gguf_checkpoint the parameter names to map the file onto
    config = transformers_offline.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers_offline.LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(smollm_path), return_tensors=True, model_to_load=model)
    theirs = theirs["tensors"]
    assert theirs.keys() == smollm_weights.keys()
    for name, ours in smollm_weights.items():
        assert torch.equal(ours, theirs[name].float()), name
    # the un-permutation is not the identity
    raw_q = raw_gguf_tensor(smollm_reader, "blk.0.attn_q.weight")
    assert not torch.equal(raw_q, smollm_weights["model.layers.0.self_attn.q_proj.weight"])


def _rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions[:, None].double() * inv_freq[None, :]  # [T, D/2]


def rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's LLaMA RoPE: rotates pairs (2j, 2j+1). x: [T, H, D]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(x.shape)


def test_unpermuted_q_k_give_llama_cpp_attention_scores_under_hf_rope(
    smollm_reader: GGUFReader, smollm_weights: dict[str, torch.Tensor], transformers_offline: Any
) -> None:
    """The transformers-independent proof: llama.cpp (raw GGUF rows + interleaved RoPE) and
    Hugging Face (our rows + rotate-half RoPE) compute the same attention scores."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, kv_heads, head_dim, base = 9, 3, 64, 100000.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 576, generator=gen, dtype=torch.float64)
    angles = _rope_angles(torch.arange(7) * 37, head_dim, base)

    def project(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
        return (x @ weight.double().T).reshape(7, num_heads, head_dim)  # [T, H, D]

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    raw_q = raw_gguf_tensor(smollm_reader, "blk.0.attn_q.weight")
    raw_k = raw_gguf_tensor(smollm_reader, "blk.0.attn_k.weight")
    llama_cpp = scores(
        rope_interleaved(project(raw_q, heads), angles),
        rope_interleaved(project(raw_k, kv_heads), angles),
    )

    cos = torch.cat((angles, angles), dim=-1).cos()[None]  # [1, T, D], HF's layout
    sin = torch.cat((angles, angles), dim=-1).sin()[None]

    def hf_scores(q_weight: torch.Tensor, k_weight: torch.Tensor) -> torch.Tensor:
        q = project(q_weight, heads).transpose(0, 1)[None]  # [1, H, T, D]
        k = project(k_weight, kv_heads).transpose(0, 1)[None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return scores(q[0].transpose(0, 1), k[0].transpose(0, 1))

    ours = hf_scores(
        smollm_weights["model.layers.0.self_attn.q_proj.weight"],
        smollm_weights["model.layers.0.self_attn.k_proj.weight"],
    )
    torch.testing.assert_close(ours, llama_cpp, rtol=1e-9, atol=1e-9)
    # and the raw rows are wrong under rotate-half RoPE: the check has teeth
    assert not torch.allclose(hf_scores(raw_q, raw_k), llama_cpp, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="session")
def reference_tokenizer(smollm_path: Path, transformers_offline: Any) -> Any:
    """transformers' tokenizer built from the same GGUF file."""
    return transformers_offline.AutoTokenizer.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name
    )


def test_tokenizer_matches_transformers(smollm: LoadedModel, reference_tokenizer: Any) -> None:
    reference = reference_tokenizer
    tokenizer = smollm.tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference(text).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.vocab_size == len(reference) == 49152


def test_tokenizer_special_tokens(smollm: LoadedModel) -> None:
    tokenizer = smollm.tokenizer
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|><|endoftext|>") == [2, 0]
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert not tokenizer.add_bos  # tokenizer.ggml.add_bos_token is false for SmolLM2
    assert tokenizer.encode("Hi") == tokenizer.encode("Hi", add_special_tokens=False)
    assert tokenizer.decode([1, 19556, 2]) == "Hello"
    assert tokenizer.encode("12345", add_special_tokens=False) == [33, 34, 35, 36, 37]


def test_chat_template(smollm: LoadedModel, reference_tokenizer: Any) -> None:
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    text = smollm.tokenizer.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # without a system message the template adds SmolLM's own
    text = smollm.tokenizer.apply_chat_template(messages[1:], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not text.endswith("<|im_start|>assistant\n")

    reference = reference_tokenizer
    rendered = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = smollm.tokenizer.encode_chat(messages)
    assert ids == reference(rendered, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 3  # one <|im_start|> per turn, no extra BOS


# --- small synthetic files -------------------------------------------------------------------


def _write_tiny_gguf(
    path: Path, weights: dict[str, np.ndarray], *, arch: str = "llama", tokenizer: str = "gpt2"
) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(12)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(["a", "b", "ab", "Ġ", "<s>", "</s>"])
    writer.add_token_types([1, 1, 1, 1, 3, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(4)
    writer.add_eos_token_id(5)
    writer.add_add_bos_token(True)
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_hf_weights(gen: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-layout weights of a 1-layer llama: hidden 8, 2 heads, 1 kv head, head_dim 4."""
    shapes = {
        "model.embed_tokens.weight": (6, 8),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.mlp.gate_proj.weight": (12, 8),
        "model.layers.0.mlp.up_proj.weight": (12, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 12),
        "model.norm.weight": (8,),
        "lm_head.weight": (6, 8),
    }
    return {name: gen.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    return f"blk.{layer}.{_TO_GGUF['.'.join(rest[:-1])]}.{rest[-1]}"


def test_tiny_gguf_round_trips_hf_weights(tmp_path: Path) -> None:
    """HF weights converted the llama.cpp way (q/k permuted, F16 for one) load back equal."""
    original = _tiny_hf_weights(np.random.default_rng(0))
    stored = {}
    for name, array in original.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(torch.from_numpy(array), 2).numpy()
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(torch.from_numpy(array), 1).numpy()
        if name.endswith("up_proj.weight"):
            array = array.astype(np.float16)
        stored[_gguf_name(name)] = array
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, stored)

    model = load_model_files(path)
    assert model.config.head_dim == 4 and model.config.num_key_value_heads == 1
    assert not model.config.tie_word_embeddings and model.config.eos_token_ids == (5,)
    loaded = dict(model.weights())
    assert loaded.keys() == original.keys()
    for name, array in original.items():
        if name.endswith("up_proj.weight"):  # stored as F16
            array = array.astype(np.float16).astype(np.float32)
        assert torch.equal(loaded[name], torch.from_numpy(array)), name
    # tokenizer.ggml.add_bos_token -> BOS on plain text; one BOS in chat (ChatML fallback)
    assert model.tokenizer.encode("ab a") == [4, 2, 3, 0]
    assert not model.tokenizer.has_chat_template
    assert model.tokenizer.encode_chat([{"role": "user", "content": "a"}])[0] == 4

    # a directory holding one GGUF file loads that file
    assert load_model_files(tmp_path).source == path


def test_unsupported_architecture_and_tokenizer(tmp_path: Path) -> None:
    weights = {"token_embd.weight": np.zeros((6, 8), dtype=np.float32)}
    _write_tiny_gguf(tmp_path / "gpt2.gguf", weights, arch="gpt2")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gpt2' is not supported"):
        load_model_files(tmp_path / "gpt2.gguf")
    _write_tiny_gguf(tmp_path / "sp.gguf", weights, tokenizer="llama")
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama' is not supported"):
        load_model_files(tmp_path / "sp.gguf")
    fused = {**weights, "blk.0.attn_qkv.weight": np.zeros((24, 8), dtype=np.float32)}
    _write_tiny_gguf(tmp_path / "odd.gguf", fused)
    with pytest.raises(ModelLoadError, match=r"tensor blk\.0\.attn_qkv\.weight is not supported"):
        load_model_files(tmp_path / "odd.gguf")


def test_corrupt_gguf_files(smollm_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with smollm_path.open("rb") as f:
        truncated.write_bytes(f.read(1_000_000))
    with pytest.raises(ModelLoadError, match="corrupt or truncated GGUF"):
        load_model_files(truncated)
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model_files(not_gguf)
