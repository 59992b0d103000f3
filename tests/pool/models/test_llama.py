"""LlamaForCausalLM against transformers (random weights, fp32, CPU), weight loading, KV cache.

Each architecture case runs one scenario through a hand-built paged cache: three prompts of
different lengths plus the first chunk of a fourth prefill in one flat (padded) batch; then a
mixed step (three decode tokens and the fourth prompt's second chunk, which attends to its
cached first chunk); then decode steps, one of them padded. Every token's logits are compared
with Hugging Face's over the whole final sequence (no cache, no padding), and every greedy
token with Hugging Face's argmax.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_testing import (  # noqa: E402
    BLOCK_SIZE,
    INTERPRETER_READY,
    ON_GPU,
    PagedRunner,
    Sequence,
    llama_config_from_hf,
    prompts,
    randomize_,
)

from helixflow.pool.models.config import ModelConfig  # noqa: E402
from helixflow.pool.models.kv_cache import (  # noqa: E402
    allocate_kv_cache,
    kv_cache_bytes_per_block,
    num_blocks_for_bytes,
)
from helixflow.pool.models.llama import LlamaForCausalLM  # noqa: E402

ATOL = RTOL = 1e-4
SMALL: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=64,
)  # fmt: skip


def _llama(**kw: Any) -> Any:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **kw}))


CASES: dict[str, Callable[[], Any]] = {
    "llama-gqa-untied": lambda: _llama(tie_word_embeddings=False),
    "smollm-mha-tied": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: _llama(rope_parameters=LLAMA3_ROPE),
    "qwen2-qkv-bias": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
    ),
    "mistral-sliding-window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**SMALL, sliding_window=7)
    ),
}


def hf_model(case: str) -> Any:
    """The case's transformers model with random O(1)-scale weights, in eval mode."""
    model = CASES[case]()
    randomize_(model, seed=sorted(CASES).index(case))
    return model.eval()


def ours_from(hf: Any, *, cpu_attention: bool = True) -> LlamaForCausalLM:
    model = LlamaForCausalLM(
        llama_config_from_hf(hf.config), dtype=torch.float32, device="cpu",
        cpu_attention=cpu_attention,
    )  # fmt: skip
    model.load_weights(hf.state_dict().items())
    return model


@pytest.mark.parametrize("cpu_attention", [True, False], ids=["cpu-plan", "kernels"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case: str, cpu_attention: bool) -> None:
    """``cpu_attention=False`` runs the kernels' torch reference through ``helixflow.kernels``."""
    hf = hf_model(case)
    cfg = llama_config_from_hf(hf.config)
    if case == "mistral-sliding-window":
        assert cfg.sliding_window == 7  # shorter than every prompt but the first
    if case == "qwen2-qkv-bias":
        assert cfg.attention_bias and cfg.tie_word_embeddings
    model = ours_from(hf, cpu_attention=cpu_attention)
    run_scenario(hf, model, PagedRunner(model))


def run_scenario(hf: Any, model: LlamaForCausalLM, runner: PagedRunner) -> None:
    """The module docstring's scenario; asserts logits and greedy tokens match ``hf``."""
    cfg = model.config
    seqs = [Sequence(p) for p in prompts(cfg.vocab_size, [5, 21, 38, 40], seed=7)]
    chunked = seqs[3]
    # logits[s][pos]: our fp32 logits of sequence s at position pos
    logits: list[dict[int, torch.Tensor]] = [{} for _ in seqs]

    def run(scheduled: list[tuple[Sequence, int]], pad_to: int = 0) -> None:
        starts = [seq.num_computed for seq, _ in scheduled]
        out = runner.step(scheduled, pad_to=pad_to)
        row = 0
        for (seq, n), start in zip(scheduled, starts, strict=True):
            for i in range(n):
                logits[seqs.index(seq)][start + i] = out[row + i]
            row += n

    def greedy(seq: Sequence) -> None:
        seq.token_ids.append(int(logits[seqs.index(seq)][len(seq.token_ids) - 1].argmax()))

    run([(seqs[0], 5), (seqs[1], 21), (seqs[2], 38), (chunked, 23)], pad_to=96)
    for seq in seqs[:3]:
        greedy(seq)
    run([(seqs[0], 1), (seqs[1], 1), (seqs[2], 1), (chunked, 17)])  # mixed: decode + chunk
    for step in range(4):
        for seq in seqs:
            greedy(seq)
        run([(seq, 1) for seq in seqs], pad_to=6 if step == 1 else 0)

    for s, seq in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids])).logits[0].float()  # [L, V]
        assert sorted(logits[s]) == list(range(len(seq.token_ids)))
        ours = torch.stack([logits[s][p] for p in range(len(seq.token_ids))])
        torch.testing.assert_close(
            ours, ref, atol=ATOL, rtol=RTOL, msg=lambda m, s=s: f"seq {s}: {m}"
        )
        prompt_len = [5, 21, 38, 40][s]
        generated = seq.token_ids[prompt_len:]
        assert generated == ref[prompt_len - 1 : -1].argmax(dim=-1).tolist()


def test_triton_kernels_match_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model through the Triton kernels (GQA, sliding window): on CUDA with a GPU, else in
    Triton's interpreter. The q/k/v views reach the kernels as strided tensors, as on CUDA."""
    pytest.importorskip("triton")
    if ON_GPU:
        device = "cuda"
    else:
        if not INTERPRETER_READY or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
        monkeypatch.setenv("HELIXFLOW_KERNELS", "triton")
        device = "cpu"
    hf = hf_model("mistral-sliding-window")
    model = LlamaForCausalLM(llama_config_from_hf(hf.config), dtype=torch.float32, device=device)
    model.load_weights(hf.state_dict().items())
    run_scenario(hf, model, PagedRunner(model))


def test_tied_checkpoint_without_lm_head() -> None:
    """A tied checkpoint as ``save_pretrained`` writes it: no ``lm_head.weight``."""
    hf = hf_model("smollm-mha-tied")
    model = LlamaForCausalLM(llama_config_from_hf(hf.config), dtype=torch.float32, device="cpu")
    model.load_weights((k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight")
    torch.testing.assert_close(model.lm_head, hf.lm_head.weight, atol=0, rtol=0)
    assert model.lm_head is model.embed_tokens


def test_load_weights_converts_dtype_and_ignores_inv_freq() -> None:
    hf = hf_model("llama-gqa-untied")
    weights = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    model = LlamaForCausalLM(llama_config_from_hf(hf.config), dtype=torch.float16, device="cpu")
    model.load_weights(weights.items())
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert model.layers[1].self_attn.qkv_proj.dtype == torch.float16
    torch.testing.assert_close(
        model.layers[1].self_attn.qkv_proj[: q.shape[0]].float(),
        q.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2,
    )  # fmt: skip


def test_load_weights_names_missing_and_unexpected() -> None:
    hf = hf_model("llama-gqa-untied")
    weights = dict(hf.state_dict())
    del weights["model.layers.1.mlp.up_proj.weight"]
    del weights["lm_head.weight"]
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    model = LlamaForCausalLM(llama_config_from_hf(hf.config), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError) as err:
        model.load_weights(weights.items())
    message = str(err.value)
    assert "missing 2: lm_head.weight, model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected 1: model.layers.0.self_attn.o_proj.bias" in message


def test_load_weights_rejects_wrong_shape() -> None:
    hf = hf_model("qwen2-qkv-bias")
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(48)
    model = LlamaForCausalLM(llama_config_from_hf(hf.config), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"k_proj\.bias.*\(48,\), expected \(32,\)"):
        model.load_weights(weights.items())


def test_rejects_bert_config_and_wrong_cache_count() -> None:
    with pytest.raises(ValueError, match="architecture 'llama'"):
        LlamaForCausalLM(bert_config(), dtype=torch.float32, device="cpu")
    model = ours_from(hf_model("llama-gqa-untied"))
    with pytest.raises(ValueError, match="expected 2 KV caches, got 1"):
        PagedRunner(model).model(
            torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
            allocate_kv_cache(model.config, 4, BLOCK_SIZE, torch.float32, "cpu")[:1],
            None,  # type: ignore[arg-type]
        )  # fmt: skip


# --- KV cache ---------------------------------------------------------------------------------


def smollm2_config() -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip


def bert_config() -> ModelConfig:
    return ModelConfig(
        architecture="bert", vocab_size=100, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
        max_position_embeddings=64,
    )  # fmt: skip


def test_kv_cache_bytes_per_block() -> None:
    cfg = smollm2_config()
    # 2 (K and V) * 30 layers * 16 tokens * 3 heads * 64 dims * 4 bytes
    assert kv_cache_bytes_per_block(cfg, 16, torch.float32) == 737_280
    assert kv_cache_bytes_per_block(cfg, 16, torch.bfloat16) == 368_640
    assert kv_cache_bytes_per_block(cfg, 32, torch.float16) == 737_280
    assert num_blocks_for_bytes(cfg, 16, torch.float32, 1 << 30) == (1 << 30) // 737_280
    assert num_blocks_for_bytes(cfg, 16, torch.float32, 737_279) == 0


def test_allocate_kv_cache() -> None:
    cfg = smollm2_config()
    caches = allocate_kv_cache(cfg, 5, 16, torch.bfloat16, "cpu")
    assert len(caches) == 30
    for k, v in caches:
        assert k.shape == v.shape == (5, 16, 3, 64)
        assert k.dtype == v.dtype == torch.bfloat16
        assert k.data_ptr() != v.data_ptr()
        assert not k.any() and not v.any()
    total = sum(k.nbytes + v.nbytes for k, v in caches)
    assert total == 5 * kv_cache_bytes_per_block(cfg, 16, torch.bfloat16)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: allocate_kv_cache(smollm2_config(), 0, 16, torch.float32, "cpu"), "num_blocks"),
        (lambda: kv_cache_bytes_per_block(smollm2_config(), 0, torch.float32), "block_size"),
        (lambda: kv_cache_bytes_per_block(bert_config(), 16, torch.float32), "'bert' has none"),
        (lambda: num_blocks_for_bytes(smollm2_config(), 16, torch.float32, -1), "num_bytes"),
    ],
)
def test_kv_cache_rejects_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
