"""Rotary position embedding: the cos/sin cache against the RoPE formulas, the torch reference
against complex rotation, and the Triton kernel against the reference.

q and k are mostly slices of one fused qkv projection output, rotated in place: the v slice and
everything else in the buffer must come out untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_testing import DTYPES, assert_close

from helixflow.kernels import rotary as tri
from helixflow.kernels.reference import rotary as ref

MAX_POSITION = 64
LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def fused_qkv(
    rng: torch.Generator,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [T, (H + 2 KV) D] projection output and its q, k, v views (strided: no copies)."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=rng).to(dtype).to(device)
    heads = qkv.view(num_tokens, -1, head_dim)
    q = heads[:, :num_heads]
    k = heads[:, num_heads : num_heads + num_kv_heads]
    v = heads[:, num_heads + num_kv_heads :]
    return qkv, q, k, v


def random_positions(rng: torch.Generator, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=rng, dtype=dtype)
    positions[0] = 0  # a padded token / the first token
    if num_tokens > 1:
        positions[-1] = MAX_POSITION - 1
    return positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_kernel_matches_reference_on_fused_qkv(
    device: str, rng: torch.Generator, head_dim: int, is_neox: bool, dtype: torch.dtype
) -> None:
    num_tokens, num_heads, num_kv_heads = 5, 6, 2
    cache = ref.rope_cos_sin_cache(head_dim, MAX_POSITION, 10000.0, device=device)
    positions = random_positions(rng, num_tokens, torch.int64).to(device)
    qkv, q, k, v = fused_qkv(
        rng, num_tokens, num_heads, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    v_before = v.clone()
    expected_q, expected_k = q.clone(), k.clone()
    ref.rotary_embedding(positions, expected_q, expected_k, cache, is_neox=is_neox)

    tri.rotary_embedding(positions, q, k, cache, is_neox=is_neox)
    assert q.data_ptr() == qkv.data_ptr()  # still views of the buffer, rotated in place
    assert_close(q, expected_q, dtype)
    assert_close(k, expected_k, dtype)
    assert torch.equal(v, v_before)


# (num_tokens, num_heads, num_kv_heads, head_dim): one token, MQA, head counts past one tile
# (32 heads of 128 or 16 of 256 per tile), a group of 3.
SHAPES = [(1, 4, 4, 64), (3, 8, 1, 128), (2, 40, 8, 128), (3, 20, 17, 256), (7, 3, 1, 80)]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_head_counts_contiguous_inputs(
    device: str, rng: torch.Generator, shape: tuple[int, int, int, int], index_dtype: torch.dtype
) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = shape
    dtype = torch.bfloat16
    cache = ref.rope_cos_sin_cache(head_dim, MAX_POSITION, 500000.0, LLAMA31_SCALING)
    cache = cache.to(device)
    positions = random_positions(rng, num_tokens, index_dtype).to(device)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=rng).to(dtype).to(device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=rng).to(dtype).to(device)
    expected_q, expected_k = q.clone(), k.clone()
    ref.rotary_embedding(positions, expected_q, expected_k, cache)
    tri.rotary_embedding(positions, q, k, cache)
    assert_close(q, expected_q, dtype)
    assert_close(k, expected_k, dtype)


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_position_zero_is_identity_and_norms_are_kept(
    device: str, rng: torch.Generator, module: Any, is_neox: bool
) -> None:
    head_dim = 96
    cache = ref.rope_cos_sin_cache(head_dim, MAX_POSITION, device=device)
    positions = torch.tensor([0, 1, 33, 63], device=device)
    q = torch.randn(4, 3, head_dim, generator=rng).to(device)
    k = torch.randn(4, 1, head_dim, generator=rng).to(device)
    q0, k0 = q.clone(), k.clone()
    module.rotary_embedding(positions, q, k, cache, is_neox=is_neox)
    torch.testing.assert_close(q[0], q0[0], rtol=0, atol=0)
    torch.testing.assert_close(k[0], k0[0], rtol=0, atol=0)
    assert not torch.allclose(q[1:], q0[1:])
    # A rotation keeps the length of every rotated pair, hence of every head.
    pairs = (
        (lambda t: t.unflatten(-1, (2, -1))) if is_neox else (lambda t: t.unflatten(-1, (-1, 2)))
    )
    dim = -2 if is_neox else -1
    assert_close(pairs(q).norm(dim=dim), pairs(q0).norm(dim=dim), torch.float32)
    assert_close(k.norm(dim=-1), k0.norm(dim=-1), torch.float32)


def test_no_tokens(device: str) -> None:
    cache = ref.rope_cos_sin_cache(64, 4, device=device)
    q = torch.empty(0, 2, 64, device=device)
    tri.rotary_embedding(torch.empty(0, dtype=torch.int64, device=device), q, q[:, :1], cache)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_reference_is_complex_rotation(rng: torch.Generator, is_neox: bool) -> None:
    head_dim, theta = 64, 10000.0
    cache = ref.rope_cos_sin_cache(head_dim, MAX_POSITION, theta)
    positions = torch.tensor([5, 0, 63])
    q = torch.randn(3, 2, head_dim, generator=rng, dtype=torch.float64)
    k = torch.randn(3, 1, head_dim, generator=rng, dtype=torch.float64)
    q_out, k_out = q.float(), k.float()
    ref.rotary_embedding(positions, q_out, k_out, cache, is_neox=is_neox)

    half = head_dim // 2
    freqs = torch.tensor([theta ** (-2 * i / head_dim) for i in range(half)], dtype=torch.float64)
    rotor = torch.polar(torch.ones(3, half, dtype=torch.float64), positions[:, None] * freqs)
    for x, out in ((q, q_out), (k, k_out)):
        if is_neox:  # element i pairs with i + half: (real, imag) = (first half, second half)
            z = torch.complex(x[..., :half], x[..., half:]) * rotor[:, None]
            expected = torch.cat((z.real, z.imag), dim=-1)
        else:  # elements 2i, 2i + 1 are one complex number
            z = torch.view_as_complex(x.unflatten(-1, (half, 2)).contiguous()) * rotor[:, None]
            expected = torch.view_as_real(z).flatten(-2)
        assert_close(out, expected, torch.float32)


def test_cache_layout_and_values() -> None:
    head_dim, theta = 8, 500.0
    cache = ref.rope_cos_sin_cache(head_dim, 1000, theta)
    assert cache.shape == (1000, head_dim) and cache.dtype == torch.float32
    for pos in (0, 1, 17, 999):
        for i in range(head_dim // 2):
            angle = pos / theta ** (2 * i / head_dim)
            assert cache[pos, i].item() == pytest.approx(math.cos(angle), abs=1e-7)
            assert cache[pos, head_dim // 2 + i].item() == pytest.approx(math.sin(angle), abs=1e-7)


def test_linear_scaling_equals_default_at_positions_over_factor() -> None:
    factor = 4
    default = ref.rope_cos_sin_cache(128, 400, 10000.0)
    linear = ref.rope_cos_sin_cache(128, 400, 10000.0, {"rope_type": "linear", "factor": factor})
    torch.testing.assert_close(linear[::factor], default[: 400 // factor], rtol=0, atol=1e-7)
    # The legacy key name means the same.
    legacy = ref.rope_cos_sin_cache(128, 400, 10000.0, {"type": "linear", "factor": factor})
    assert torch.equal(legacy, linear)


def test_default_rope_type_equals_no_scaling() -> None:
    plain = ref.rope_cos_sin_cache(64, 10)
    assert torch.equal(ref.rope_cos_sin_cache(64, 10, scaling={"rope_type": "default"}), plain)


def test_llama3_scaling_bands() -> None:
    head_dim, theta = 128, 500000.0
    default = ref.rope_inv_freq(head_dim, theta)
    scaled = ref.rope_inv_freq(head_dim, theta, LLAMA31_SCALING)
    wavelen = 2 * math.pi / default
    high = wavelen < 8192 / 4.0  # short wavelengths: unchanged
    low = wavelen > 8192 / 1.0  # long wavelengths: divided by factor
    mid = ~high & ~low
    assert high.sum() > 0 and low.sum() > 0 and mid.sum() > 0
    assert torch.equal(scaled[high], default[high])
    torch.testing.assert_close(scaled[low], default[low] / 8.0, rtol=1e-15, atol=0)
    assert bool(((scaled[mid] < default[mid]) & (scaled[mid] > default[mid] / 8.0)).all())
    # Blending is monotone in wavelength: frequencies keep their order.
    assert bool((scaled[1:] < scaled[:-1]).all())
    # The cache holds these frequencies: the angle at position 1 is inv_freq itself.
    cache = ref.rope_cos_sin_cache(head_dim, 2, theta, LLAMA31_SCALING)
    angles = torch.atan2(cache[1, head_dim // 2 :], cache[1, : head_dim // 2])
    assert_close(angles, scaled, torch.float32)


def _bad_cache_calls() -> list[tuple[str, Callable[[], object]]]:
    """(text the error starts with, call that raises it)."""
    cache = ref.rope_cos_sin_cache
    llama3 = dict(LLAMA31_SCALING)
    del llama3["low_freq_factor"]
    return [
        ("head_dim", lambda: cache(63, 10)),
        ("head_dim", lambda: cache(0, 10)),
        ("head_dim", lambda: cache(64.0, 10)),  # type: ignore[arg-type]
        ("theta", lambda: cache(64, 10, 0.0)),
        ("max_position", lambda: cache(64, 0)),
        ("rope_scaling['rope_type']", lambda: cache(64, 10, scaling={"factor": 2.0})),
        ("rope_scaling['rope_type']", lambda: cache(64, 10, scaling={"rope_type": "yarn"})),
        ("rope_scaling['type']", lambda: cache(64, 10, scaling={"type": "dynamic"})),
        ("rope_scaling['factor']", lambda: cache(64, 10, scaling={"rope_type": "linear"})),
        ("rope_scaling['factor']", lambda: cache(64, 10, scaling={"type": "linear", "factor": 0})),
        (
            "rope_scaling['factor']",
            lambda: cache(64, 10, scaling={"type": "linear", "factor": "2"}),
        ),
        ("rope_scaling['low_freq_factor']", lambda: cache(64, 10, scaling=llama3)),
        (
            "rope_scaling['high_freq_factor']",
            lambda: cache(64, 10, scaling={**LLAMA31_SCALING, "high_freq_factor": 1.0}),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cache_calls())))
def test_bad_cache_arguments_raise(case: int) -> None:
    text, call = _bad_cache_calls()[case]
    with pytest.raises(ValueError, match="^" + re.escape(text)):
        call()


def _bad_rotary_calls(device: str) -> list[tuple[str, Callable[[Any], object]]]:
    """(argument named in the error, call of a module's rotary_embedding with it wrong)."""
    cache = ref.rope_cos_sin_cache(64, 16, device=device)
    pos = torch.zeros(3, dtype=torch.int64, device=device)
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    return [
        ("q", lambda m: m.rotary_embedding(pos, q[0], k, cache)),
        ("q", lambda m: m.rotary_embedding(pos, q.long(), k, cache)),
        ("q", lambda m: m.rotary_embedding(pos, q[..., :63], k[..., :63], cache)),
        ("k", lambda m: m.rotary_embedding(pos, q, k[..., :32], cache)),
        ("k", lambda m: m.rotary_embedding(pos, q, k[:2], cache)),
        ("q and k", lambda m: m.rotary_embedding(pos, q, k.half(), cache)),
        ("positions", lambda m: m.rotary_embedding(pos.float(), q, k, cache)),
        ("positions", lambda m: m.rotary_embedding(pos[:2], q, k, cache)),
        ("cos_sin_cache", lambda m: m.rotary_embedding(pos, q, k, cache.half())),
        ("cos_sin_cache", lambda m: m.rotary_embedding(pos, q, k, cache[:, :32])),
    ]


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
@pytest.mark.parametrize("case", range(len(_bad_rotary_calls("cpu"))))
def test_bad_rotary_arguments_raise(device: str, module: Any, case: int) -> None:
    name, call = _bad_rotary_calls(device)[case]
    with pytest.raises(ValueError, match=f"^{name} "):
        call(module)


def test_kernel_layout_errors(device: str) -> None:
    cache = ref.rope_cos_sin_cache(64, 16, device=device)
    pos = torch.zeros(3, dtype=torch.int64, device=device)
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    with pytest.raises(ValueError, match=r"^q must have unit stride"):
        tri.rotary_embedding(pos, torch.randn(3, 64, 4, device=device).transpose(1, 2), k, cache)
    with pytest.raises(ValueError, match=r"^k must have unit stride"):
        tri.rotary_embedding(pos, q, torch.randn(3, 64, 2, device=device).transpose(1, 2), cache)
    with pytest.raises(ValueError, match=r"^positions must be contiguous"):
        tri.rotary_embedding(torch.zeros(6, dtype=torch.int64, device=device)[::2], q, k, cache)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache = ref.rope_cos_sin_cache(64, 16)
    with pytest.raises(ValueError, match=r"^q is on cpu"):
        tri.rotary_embedding(
            torch.zeros(1, dtype=torch.int64), torch.randn(1, 2, 64), torch.randn(1, 1, 64), cache
        )
