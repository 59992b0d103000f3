"""KV-cache write: the Triton kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES

from helixflow.kernels import kv_cache as tri
from helixflow.kernels.reference import kv_cache as ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim", "block_size"),
    [(1, 1, 64, 16), (17, 2, 80, 16), (33, 8, 128, 8), (5, 3, 96, 1), (9, 4, 256, 32)],
)
def test_write_matches_reference(
    dtype: torch.dtype,
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    device: str,
    rng: torch.Generator,
) -> None:
    num_blocks = num_tokens // block_size + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=rng).to(dtype)
    value_cache = torch.randn(shape, generator=rng).to(dtype)
    # A fused qkv projection output: key and value are strided views of it.
    qkv = torch.randn(num_tokens, 4 + 2 * num_kv_heads, head_dim, generator=rng).to(dtype)
    key, value = qkv[:, 4 : 4 + num_kv_heads], qkv[:, 4 + num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=rng)[:num_tokens]
    slots[::3] = -1  # padded tokens
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    ref.write_kv_cache(key, value, expected_k, expected_v, slots)

    got_k, got_v = key_cache.clone().to(device), value_cache.clone().to(device)
    tri.write_kv_cache(key.to(device), value.to(device), got_k, got_v, slots.to(device))
    # A copy is exact: every slot written, every other slot untouched.
    assert torch.equal(got_k.cpu(), expected_k)
    assert torch.equal(got_v.cpu(), expected_v)
    assert not torch.equal(expected_k, key_cache) or bool((slots < 0).all())


def test_all_padding_and_empty_step_write_nothing(device: str) -> None:
    key_cache = torch.zeros(2, 4, 1, 8, device=device)
    value_cache = torch.zeros(2, 4, 1, 8, device=device)
    kv = torch.ones(3, 1, 8, device=device)
    tri.write_kv_cache(kv, kv, key_cache, value_cache, torch.full((3,), -1, device=device))
    empty = torch.ones(0, 1, 8, device=device)
    tri.write_kv_cache(empty, empty, key_cache, value_cache,
                       torch.zeros(0, dtype=torch.int64, device=device))  # fmt: skip
    assert not key_cache.any() and not value_cache.any()


def test_int32_slot_mapping_and_last_slot(device: str) -> None:
    key_cache = torch.zeros(3, 4, 2, 16, device=device)
    value_cache = torch.zeros(3, 4, 2, 16, device=device)
    k = torch.arange(32, dtype=torch.float32, device=device).view(1, 2, 16)
    tri.write_kv_cache(k, -k, key_cache, value_cache,
                       torch.tensor([11], dtype=torch.int32, device=device))  # fmt: skip
    assert torch.equal(key_cache[2, 3], k[0]) and torch.equal(value_cache[2, 3], -k[0])
    assert int((key_cache != 0).sum()) == 31  # element 0 of the row is 0.0 itself


def _args(device: str) -> dict[str, torch.Tensor]:
    return {
        "key": torch.zeros(4, 2, 16, device=device),
        "value": torch.zeros(4, 2, 16, device=device),
        "key_cache": torch.zeros(3, 4, 2, 16, device=device),
        "value_cache": torch.zeros(3, 4, 2, 16, device=device),
        "slot_mapping": torch.arange(4, device=device),
    }


@pytest.mark.parametrize(
    ("field", "make_bad", "message"),
    [
        ("key", lambda t: t[:, :1], r"key must be \[num_tokens, 2, 16\]"),
        ("value", lambda t: t[:3], "key has 4 tokens but value has 3"),
        ("value", lambda t: t.half(), "key and value must have the same dtype"),
        ("key", lambda t: t.transpose(1, 2), "key must have unit stride"),
        ("key_cache", lambda t: t[0], "key_cache must have 4 dimensions"),
        ("key_cache", lambda t: t.int(), "key_cache must have dtype"),
        ("value_cache", lambda t: t[:2], "value_cache shape"),
        ("value_cache", lambda t: t.transpose(0, 1), "value_cache must be contiguous"),
        ("slot_mapping", lambda t: t.float(), "slot_mapping must have dtype"),
        ("slot_mapping", lambda t: t[:2], "slot_mapping has 2 entries for 4 tokens"),
    ],
)
def test_bad_arguments_name_the_argument(
    field: str, make_bad: object, message: str, device: str
) -> None:
    args = _args(device)
    args[field] = make_bad(args[field])  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        tri.write_kv_cache(**args)
