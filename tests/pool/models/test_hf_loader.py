"""Hugging Face directories: all-MiniLM-L6-v2 against safetensors and transformers, and small
synthetic directories (Llama/Qwen2 configs, a sharded index, broken files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from helixflow.errors import ModelLoadError
from helixflow.pool.models.hf_loader import hf_config, hf_weight_files, iter_hf_weights
from helixflow.pool.models.loader import LoadedModel, load_model_files

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "UPPER and lower CaSe are folded",
    "naïve café déjà vu — Straße",
    "日本語のテキスト",
    "emoji 🤖 unknown",
    "def f(x):\n    return x**2",
    "numbers 12345 and 3.14159",
    "[CLS] literal special [SEP] tokens [MASK]",
    "   ",
]


def test_minilm_config(minilm: LoadedModel) -> None:
    config = minilm.config
    assert minilm.format == "hf"
    assert config.architecture == "bert"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        384,
        6,
        12,
    )
    assert (config.head_dim, config.num_key_value_heads) == (32, 12)
    assert (config.intermediate_size, config.vocab_size) == (1536, 30522)
    assert (config.max_position_embeddings, config.type_vocab_size) == (512, 2)
    assert config.layer_norm_eps == 1e-12 and config.pad_token_id == 0
    assert config.eos_token_ids == ()
    assert minilm.chat_template is None
    assert minilm.embedding is not None
    assert (minilm.embedding.pooling, minilm.embedding.normalize) == ("mean", True)
    assert minilm.embedding.max_seq_length == 256


def test_minilm_weights_match_safetensors(minilm: LoadedModel, minilm_path: Path) -> None:
    with safe_open(str(minilm_path / "model.safetensors"), framework="pt") as f:
        expected = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    loaded = dict(minilm.weights())
    assert loaded.keys() == expected.keys() == set(minilm.weight_names)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert loaded["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert loaded["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)


def test_minilm_tokenizer_matches_transformers(
    minilm: LoadedModel, minilm_path: Path, transformers_offline: Any
) -> None:
    reference = transformers_offline.AutoTokenizer.from_pretrained(str(minilm_path))
    tokenizer = minilm.tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference(text).input_ids, text
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
        assert tokenizer.encode(text, add_special_tokens=False) == ids[1:-1]
    assert tokenizer.decode(tokenizer.encode("Hello World!")) == "hello world!"
    # tokenizer.json pads and truncates to 128; the wrapper leaves lengths to the engine
    assert len(tokenizer.encode("word " * 300)) == 302
    assert tokenizer.vocab_size == 30522 and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None


# --- small synthetic directories --------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _tiny_llama_dir(directory: Path, **config: Any) -> dict[str, torch.Tensor]:
    """A 2-layer Llama-shaped directory with weights split over two shards."""
    _write_json(
        directory / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 5,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "eos_token_id": 2,
            "bos_token_id": 1,
            **config,
        },
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True},
    )
    gen = torch.Generator().manual_seed(0)
    weights = {
        f"model.layers.{i}.{part}": torch.randn(8, 8, generator=gen, dtype=torch.bfloat16)
        for i in range(2)
        for part in ("self_attn.q_proj.weight", "self_attn.o_proj.weight")
    } | {"model.embed_tokens.weight": torch.randn(5, 8, generator=gen)}
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(directory / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    _write_json(
        directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}
    )
    return weights


def test_sharded_directory_loads(tmp_path: Path) -> None:
    weights = _tiny_llama_dir(tmp_path)
    model = load_model_files(tmp_path)
    assert model.config.architecture == "llama" and model.config.head_dim == 4
    assert model.config.num_key_value_heads == 2 and not model.config.attention_bias
    assert set(model.weight_names) == set(weights)
    loaded = dict(model.weights())
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert dict(model.weights()).keys() == weights.keys()  # each call is a fresh pass
    # add_bos_token from tokenizer_config.json puts <s> first; eos from a dict entry
    assert model.tokenizer.encode("hello world") == [1, 3, 4]
    assert model.tokenizer.eos_token_id == 2
    assert model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])[0] == 1


def test_qwen2_config_and_generation_eos(tmp_path: Path) -> None:
    _tiny_llama_dir(
        tmp_path,
        architectures=["Qwen2ForCausalLM"],
        num_key_value_heads=1,
        head_dim=16,
        eos_token_id=[2, 4],
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=4096,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
    )
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [4, 3]})
    config = hf_config(tmp_path)
    assert config.attention_bias and config.tie_word_embeddings
    assert config.head_dim == 16 and config.num_key_value_heads == 1
    assert config.eos_token_ids == (2, 4, 3)
    assert config.sliding_window is None
    assert config.rope_theta == 1e6 and config.rope_scaling is None


def test_rope_scaling_is_kept(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    _tiny_llama_dir(tmp_path, rope_theta=500000.0, rope_scaling=scaling)
    config = hf_config(tmp_path)
    assert config.rope_theta == 500000.0 and config.rope_scaling == scaling


def test_missing_config_json(minilm_path: Path, tmp_path: Path) -> None:
    shutil.copytree(minilm_path, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json \(Hugging Face format\)"):
        load_model_files(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"config\.json is missing from the model directory"):
        hf_config(tmp_path / "m")


def test_corrupt_safetensors(tmp_path: Path) -> None:
    _tiny_llama_dir(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="is not a valid safetensors file") as info:
        load_model_files(tmp_path)
    assert str(shard) in info.value.message


def test_truncated_safetensors(minilm_path: Path, tmp_path: Path) -> None:
    directory = tmp_path / "m"
    shutil.copytree(minilm_path, directory)
    weights = directory / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(1_000_000)
    with pytest.raises(ModelLoadError, match="is not a valid safetensors file") as info:
        load_model_files(directory)
    assert str(weights) in info.value.message


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_shard", "weights file .* is missing"),
        ("wrong_shard", "tensor model.embed_tokens.weight is not in"),
        ("no_weights", "only safetensors weights are supported"),
        ("bad_json", "is not readable JSON"),
        ("unknown_arch", r"architecture \['GPT2LMHeadModel'\] is not supported"),
        ("missing_key", "required key 'hidden_size' is missing"),
        ("bad_value", "num_attention_heads .* must be a multiple"),
        ("no_tokenizer", "tokenizer.json is missing"),
        ("bad_template", "chat template is invalid"),
    ],
)
def test_broken_directories(breakage: str, message: str, tmp_path: Path) -> None:
    _tiny_llama_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if breakage == "missing_shard":
        (tmp_path / "model-00001-of-00002.safetensors").unlink()
    elif breakage == "wrong_shard":
        index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"
        _write_json(index_path, index)
    elif breakage == "no_weights":
        index_path.unlink()
    elif breakage == "bad_json":
        (tmp_path / "config.json").write_text("{not json")
    elif breakage == "unknown_arch":
        _write_json(tmp_path / "config.json", config | {"architectures": ["GPT2LMHeadModel"]})
    elif breakage == "missing_key":
        del config["hidden_size"]
        _write_json(tmp_path / "config.json", config)
    elif breakage == "bad_value":
        _write_json(tmp_path / "config.json", config | {"num_key_value_heads": 3})
    elif breakage == "no_tokenizer":
        (tmp_path / "tokenizer.json").unlink()
    elif breakage == "bad_template":
        _write_json(tmp_path / "tokenizer_config.json", {"chat_template": "{% for %}"})
    with pytest.raises(ModelLoadError, match=message):
        load_model_files(tmp_path)


def test_iter_weights_reads_lazily(tmp_path: Path) -> None:
    _tiny_llama_dir(tmp_path)
    files = hf_weight_files(tmp_path)
    assert [p.name for p in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    weights = iter_hf_weights(files)
    first_name, _ = next(weights)
    assert first_name == files[next(iter(files))][0]
    weights.close()
