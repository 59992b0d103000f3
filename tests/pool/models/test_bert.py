"""BertModel against transformers.BertModel (random weights, fp32, CPU), pooling and loading."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_testing import randomize_  # noqa: E402

from helixflow.pool.models.bert import BertModel  # noqa: E402
from helixflow.pool.models.config import ModelConfig  # noqa: E402

ATOL = RTOL = 1e-4


def hf_bert(**kw: Any) -> Any:
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, **kw,
    )  # fmt: skip
    model = transformers.BertModel(config)
    randomize_(model, seed=3)
    return model.eval()


def config_from_hf(hf: Any) -> ModelConfig:
    c = hf.config
    return ModelConfig(
        architecture="bert", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
        type_vocab_size=c.type_vocab_size,
    )  # fmt: skip


def ours_from(hf: Any, prefix: str = "") -> BertModel:
    model = BertModel(config_from_hf(hf), dtype=torch.float32, device="cpu")
    model.load_weights((prefix + k, v) for k, v in hf.state_dict().items())
    return model


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded sequences of lengths 11, 4 and 7 (padding id 0)."""
    gen = torch.Generator().manual_seed(5)
    lengths = [11, 4, 7]
    ids = torch.randint(1, vocab_size, (3, 11), generator=gen)
    mask = (torch.arange(11)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_last_hidden_state_matches_transformers() -> None:
    hf = hf_bert()
    ids, mask = padded_batch(120)
    token_types = (torch.arange(11) >= 5).long().expand(3, 11)
    ours = ours_from(hf)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        got = ours(ids, mask, token_types)
        ref_default = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    # every row, padded positions too: their queries attend to the real tokens in both
    torch.testing.assert_close(got, ref.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours(ids, mask), ref_default, atol=ATOL, rtol=RTOL)


def test_embed_is_mean_pool_then_l2_normalize() -> None:
    hf = hf_bert()
    ids, mask = padded_batch(120)
    ours = ours_from(hf)
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.embed(ids, mask)
    m = mask[..., None].float()
    expected = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (3, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # a sequence's embedding does not depend on the padding around it
    alone = ours.embed(ids[1:2, :4], mask[1:2, :4])
    torch.testing.assert_close(alone[0], got[1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len"])
def test_other_pooling_modes(pooling: str) -> None:
    hf = hf_bert()
    ids, mask = padded_batch(120)
    ours = ours_from(hf)
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.embed(ids, mask, pooling=pooling, normalize=False)
    m = mask[..., None].float()
    expected = {
        "cls": states[:, 0],
        "max": states.masked_fill(m == 0, -1e9).amax(1),
        "mean_sqrt_len": (states * m).sum(1) / m.sum(1).sqrt(),
    }[pooling]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="pooling must be one of"):
        ours.embed(ids, mask, pooling="lasttoken")


def test_masked_lm_checkpoint_names_load() -> None:
    """``bert.``-prefixed names with task-head weights, as BertForMaskedLM saves them."""
    hf = hf_bert()
    weights = {"bert." + k: v for k, v in hf.state_dict().items()}
    weights["cls.predictions.bias"] = torch.zeros(120)
    weights["bert.embeddings.position_ids"] = torch.arange(64)[None]
    ours = BertModel(config_from_hf(hf), dtype=torch.float32, device="cpu")
    ours.load_weights(weights.items())
    torch.testing.assert_close(ours.word_embeddings, hf.embeddings.word_embeddings.weight)


def test_load_weights_names_missing_and_unexpected() -> None:
    hf = hf_bert()
    weights = dict(hf.state_dict())
    del weights["encoder.layer.1.attention.self.key.bias"]
    weights["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    ours = BertModel(config_from_hf(hf), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError) as err:
        ours.load_weights(weights.items())
    assert "missing 1: encoder.layer.1.attention.self.key.bias" in str(err.value)
    assert "unexpected 1: encoder.layer.0.attention.self.rotary.weight" in str(err.value)
    weights = dict(hf.state_dict())
    weights["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(96, 47)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*\(96, 47\)"):
        ours.load_weights(weights.items())


def test_rejects_llama_config_and_long_input() -> None:
    hf = hf_bert()
    cfg = config_from_hf(hf)
    llama = msgspec.structs.replace(cfg, architecture="llama")
    with pytest.raises(ValueError, match="architecture 'bert'"):
        BertModel(llama, dtype=torch.float32, device="cpu")
    ours = ours_from(hf)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        ours(torch.zeros(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))
