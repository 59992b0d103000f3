"""The embeddings engine on the real all-MiniLM-L6-v2 weights: meaning, parity with
transformers, batch invariance, inputs as text or token ids, usage counts and errors."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helixflow.errors import ConfigError, InvalidRequestError
from helixflow.pool.embedder import Embedder, build_embedder, plan_batches
from helixflow.pool.models.loader import LoadedModel, load_model_files

ATOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "hi",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun "
    "while the farmer's children count clouds and argue about their shapes.",
    "Embeddings map text to vectors.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
]
LONG_TEXT = "word " * 300  # 302 tokens with [CLS] and [SEP]; MiniLM takes 256


@pytest.fixture(scope="module")
def embedder(minilm: LoadedModel) -> Embedder:
    return build_embedder(minilm, device="cpu")


@pytest.fixture(scope="module")
def alone(embedder: Embedder) -> torch.Tensor:
    """Each of SENTENCES embedded on its own: [len(SENTENCES), 384]."""
    return torch.cat([embedder.embed([text]).embeddings for text in SENTENCES])


def rebudgeted(embedder: Embedder, max_batch_tokens: int) -> Embedder:
    """The same weights and tokenizer under another token budget."""
    return Embedder(
        embedder.model, embedder.tokenizer, pooling=embedder.pooling,
        max_model_len=embedder.max_model_len, max_batch_tokens=max_batch_tokens,
    )  # fmt: skip


def test_similar_sentences_are_closer(embedder: Embedder) -> None:
    result = embedder.embed(["eating food", "eating bread", "carrying a baby"])
    vectors = result.embeddings
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    food_bread = float(vectors[0] @ vectors[1])
    food_baby = float(vectors[0] @ vectors[2])
    assert food_bread > food_baby + 0.3, (food_bread, food_baby)


def test_matches_transformers_mean_pooling(
    embedder: Embedder, minilm_path: Path, transformers_offline: Any
) -> None:
    tokenizer = transformers_offline.AutoTokenizer.from_pretrained(str(minilm_path))
    hf = transformers_offline.BertModel.from_pretrained(str(minilm_path)).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = hf(**batch).last_hidden_state  # [B, L, 384]
    mask = batch["attention_mask"][..., None].float()
    expected = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    result = embedder.embed(SENTENCES)
    torch.testing.assert_close(result.embeddings, expected, atol=ATOL, rtol=0)
    # the same token ids as transformers' tokenizer, without and with truncation
    assert embedder.tokenize(SENTENCES) == tokenizer(SENTENCES)["input_ids"]
    truncated = tokenizer(LONG_TEXT, truncation=True, max_length=256)["input_ids"]
    assert embedder.tokenize([LONG_TEXT], truncate=True) == [truncated]


@pytest.mark.parametrize("max_batch_tokens", [16384, 40, 1])
def test_an_input_does_not_depend_on_its_batch(
    embedder: Embedder, alone: torch.Tensor, max_batch_tokens: int
) -> None:
    """One batch, several batches and one input per batch; order kept in every case."""
    texts = [*SENTENCES, "short", "a somewhat longer filler sentence " * 4, *SENTENCES[:2]]
    result = rebudgeted(embedder, max_batch_tokens).embed(texts)
    torch.testing.assert_close(result.embeddings[: len(SENTENCES)], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(result.embeddings[-2:], alone[:2], atol=ATOL, rtol=0)


def test_token_ids_run_as_given(embedder: Embedder) -> None:
    ids = [embedder.tokenizer.encode(text) for text in SENTENCES[:3]]
    from_text = embedder.embed(SENTENCES[:3])
    from_ids = embedder.embed(ids)
    torch.testing.assert_close(from_ids.embeddings, from_text.embeddings, atol=ATOL, rtol=0)
    assert from_ids.num_tokens == from_text.num_tokens
    mixed = embedder.embed([SENTENCES[0], ids[1]])
    torch.testing.assert_close(mixed.embeddings, from_text.embeddings[:2], atol=ATOL, rtol=0)


def test_usage_counts_special_tokens(embedder: Embedder) -> None:
    result = embedder.embed(["hello world", "hi", [101, 7592, 102]])
    assert result.num_tokens == (4, 3, 3)  # [CLS] hello world [SEP], [CLS] hi [SEP]
    assert result.num_prompt_tokens == 10


def test_normalize_false_keeps_the_pooled_length(embedder: Embedder) -> None:
    raw = embedder.embed(SENTENCES[:2], normalize=False).embeddings
    unit = embedder.embed(SENTENCES[:2]).embeddings
    assert (raw.norm(dim=-1) - 1).abs().min() > 0.01
    torch.testing.assert_close(F.normalize(raw, dim=-1), unit, atol=ATOL, rtol=0)


def test_too_long_input_names_its_index_and_lengths(embedder: Embedder) -> None:
    with pytest.raises(InvalidRequestError) as err:
        embedder.embed(["fine", LONG_TEXT])
    assert "input[1] is 302 tokens long" in err.value.message
    assert "maximum is 256 tokens" in err.value.message
    body = err.value.to_openai()["error"]
    assert err.value.status == 400 and body["type"] == "invalid_request_error"
    assert body["param"] == "input" and body["code"] == "context_length_exceeded"
    with pytest.raises(InvalidRequestError, match=r"input\[0\] is 257 tokens"):
        embedder.embed([[101] * 257])


def test_truncate_keeps_the_head_and_the_special_tokens(embedder: Embedder) -> None:
    result = embedder.embed([LONG_TEXT, "fine", [101] * 300], truncate=True)
    assert result.num_tokens == (256, 3, 256)
    ids = embedder.tokenize([LONG_TEXT], truncate=True)[0]
    full = embedder.tokenizer.encode(LONG_TEXT)
    assert ids == [*full[:255], full[-1]]  # [CLS] word x 254 [SEP]
    direct = embedder.embed([ids]).embeddings[0]
    torch.testing.assert_close(result.embeddings[0], direct, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "input must not be empty"),
        (["ok", ""], r"input\[1\] is an empty string"),
        ([[]], r"input\[0\] is an empty token list"),
        ([[101, 30522]], r"input\[0\] holds token id 30522, outside .* \(0\.\.30521\)"),
        ([[101, -1]], r"input\[0\] holds token id -1"),
        ([1, 2, 3], r"input\[0\] must be a string or a list of integer token ids"),
        ([[101, 1.5]], r"input\[0\] must be a string or a list of integer token ids"),
        ([None], r"input\[0\] must be a string"),
    ],
)
def test_bad_inputs_are_invalid_requests(
    embedder: Embedder, inputs: list[Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as err:
        embedder.embed(inputs)
    assert err.value.param == "input"


def test_a_bare_string_is_a_caller_error(embedder: Embedder) -> None:
    with pytest.raises(TypeError, match="not a str"):
        embedder.embed("hello")


def test_a_chat_model_is_not_an_embedding_model(smollm: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="is a llama model, not an embedding"):
        build_embedder(smollm)


def test_bad_options_are_config_errors(embedder: Embedder, minilm: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="dtype: must be one of"):
        build_embedder(minilm, dtype="float64")
    with pytest.raises(ConfigError, match="device: 'tpu9' is not a torch device"):
        build_embedder(minilm, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU is available"):
            build_embedder(minilm, device="cuda")
    with pytest.raises(ConfigError, match="max_batch_tokens: must be >= 1"):
        rebudgeted(embedder, 0)
    with pytest.raises(ConfigError, match=r"max_model_len: must be in 1\.\.512"):
        Embedder(embedder.model, embedder.tokenizer, pooling="mean", max_model_len=513)
    with pytest.raises(ConfigError, match="pooling: must be one of"):
        Embedder(embedder.model, embedder.tokenizer, pooling="lasttoken", max_model_len=8)


def test_bfloat16_stays_close_to_float32(embedder: Embedder, minilm: LoadedModel) -> None:
    low = build_embedder(minilm, device="cpu", dtype="bfloat16").embed(SENTENCES[:2])
    cosine = (low.embeddings * embedder.embed(SENTENCES[:2]).embeddings).sum(-1)
    assert low.embeddings.dtype == torch.float32
    assert cosine.min() > 0.99, cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(embedder: Embedder, minilm: LoadedModel) -> None:
    on_gpu = build_embedder(minilm, device="cuda")
    assert on_gpu.device.type == "cuda"
    result = on_gpu.embed(SENTENCES)
    assert result.embeddings.device.type == "cpu"
    torch.testing.assert_close(result.embeddings, embedder.embed(SENTENCES).embeddings,
                               atol=1e-4, rtol=0)  # fmt: skip


def copy_with_pooling(source: Path, target: Path, pooling_key: str | None) -> Path:
    """A copy of the model directory (weights linked) with another pooling, or none."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_file():
            (target / item.name).symlink_to(item)
    if pooling_key is None:
        (target / "modules.json").unlink()
        return target
    shutil.copytree(source / "1_Pooling", target / "1_Pooling")
    config_path = target / "1_Pooling" / "config.json"
    config = json.loads(config_path.read_text())
    config = {k: (k == pooling_key) if k.startswith("pooling_mode") else v
              for k, v in config.items()}  # fmt: skip
    config_path.write_text(json.dumps(config))
    return target


def test_pooling_comes_from_the_model(minilm_path: Path, tmp_path: Path) -> None:
    cls_dir = copy_with_pooling(minilm_path, tmp_path / "cls", "pooling_mode_cls_token")
    cls_embedder = build_embedder(load_model_files(cls_dir), device="cpu")
    assert cls_embedder.pooling == "cls"
    ids = torch.tensor([cls_embedder.tokenize(["a cat sat"])[0]])
    with torch.no_grad():
        states = cls_embedder.model(ids, torch.ones_like(ids))  # [1, L, 384]
    expected = F.normalize(states[:, 0], dim=-1)
    torch.testing.assert_close(cls_embedder.embed(["a cat sat"]).embeddings, expected)
    # no sentence-transformers files: mean pooling, as sentence-transformers falls back to
    plain_dir = copy_with_pooling(minilm_path, tmp_path / "plain", None)
    plain = build_embedder(load_model_files(plain_dir), device="cpu")
    assert plain.pooling == "mean" and plain.max_model_len == 512


def test_plan_batches_covers_every_input_within_the_budget() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    for budget in (1, 64, 500, 4096, 10**6):
        batches = plan_batches(lengths, budget)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        for batch in batches:
            width = max(lengths[i] for i in batch)
            assert len(batch) == 1 or len(batch) * width <= budget
            assert lengths[batch[0]] == width  # padded to the first member
        # greedy: the next batch's first input would not have fitted in the previous batch
        for prev, nxt in itertools.pairwise(batches):
            assert (len(prev) + 1) * lengths[prev[0]] > budget
            assert lengths[nxt[0]] <= lengths[prev[-1]]
    assert plan_batches([], 10) == []
