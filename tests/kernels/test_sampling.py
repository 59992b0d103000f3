"""Batched token sampling: the Triton kernel against the torch reference, and both against math.

The reference reproduces Triton's Philox bit for bit, so under the interpreter kernel and
reference draw the SAME token for every row; on a GPU, where ``tl.log`` may round differently,
tokens may differ only where two perturbed logits nearly tie. The statistical tests draw 20000
tokens (one per row, distinct seeds) and bound every token's count with a Bernstein inequality so
that a correct sampler fails with probability < 1e-6. Under the interpreter the kernel costs a
few milliseconds per row, so those run on the reference there (equal to the kernel bit for bit),
plus one smaller run of the kernel itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from kernel_testing import DTYPES

from helixflow.kernels import sampling as tri
from helixflow.kernels.reference import sampling as ref

SampleFn = Callable[..., torch.Tensor]

BLOCK_V = tri._launch_config(10**6)[0]  # the largest tile: 1024 interpreted, 4096 on a GPU
VOCABS = [1, 7, 1000, BLOCK_V - 1, BLOCK_V + 1, 5000]
LOGITS_8 = [1.2, -0.3, 2.0, 0.4, -1.5, 0.9, -0.8, 0.1]  # distinct, not sorted by index
FAILURE_PROB = 1e-6


@triton.jit
def _randint_kernel(seeds_ptr, offsets_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, N)
    bits = tl.randint(tl.load(seeds_ptr + row), tl.load(offsets_ptr + cols))
    tl.store(out_ptr + row * N + cols, bits.to(tl.int64))


@triton.jit
def _gumbel_kernel(seeds_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, N)
    tl.store(out_ptr + row * N + cols, tri._gumbel_noise(tl.load(seeds_ptr + row), cols))


SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32 + 7, 2**62 + 99, -1, -(2**63)]


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_philox_matches_triton_randint(device: str, offset_dtype: torch.dtype) -> None:
    offsets = [0, 1, 2, 3, 1000, 2**31 - 1, -1, -(2**31)]
    if offset_dtype == torch.int64:
        offsets[4:] = [2**32, 2**32 + 5, 2**40 + 3, -(2**62)]
    seeds_t = torch.tensor(SEEDS, dtype=torch.int64, device=device)
    offsets_t = torch.tensor(offsets, dtype=offset_dtype, device=device)
    out = torch.empty(len(SEEDS), len(offsets), dtype=torch.int64, device=device)
    _randint_kernel[(len(SEEDS),)](seeds_t, offsets_t, out, N=len(offsets))
    np_offsets = np.array(offsets, dtype=np.int32 if offset_dtype == torch.int32 else np.int64)
    expected = ref.philox_randint(np.array(SEEDS, dtype=np.int64), np_offsets)
    assert expected.dtype == np.uint32
    np.testing.assert_array_equal(out.cpu().numpy(), expected.astype(np.int64))


def test_gumbel_noise_matches_reference(device: str) -> None:
    n = 256
    seeds = torch.tensor(SEEDS, dtype=torch.int64, device=device)
    out = torch.empty(len(SEEDS), n, dtype=torch.float32, device=device)
    _gumbel_kernel[(len(SEEDS),)](seeds, out, N=n)
    expected = ref.gumbel_noise(np.array(SEEDS, dtype=np.int64), n)
    if device == "cpu":  # the interpreter runs numpy's fp32 log, like the reference
        np.testing.assert_array_equal(out.numpy(), expected)
    else:
        np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gumbel_uniform_stays_in_open_interval() -> None:
    noise = ref.gumbel_from_bits(np.array([0, 511, 2**32 - 512, 2**32 - 1], dtype=np.uint32))
    assert np.isfinite(noise).all()
    assert noise[0] == noise[1] < noise[2] == noise[3]


def _row_params(
    batch: int, vocab: int, rng: torch.Generator, device: str, k_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Per-row parameters cycling through greedy, each filter alone, all, none, edge values."""
    temperature = 0.3 + 1.5 * torch.rand(batch, generator=rng)
    top_k = torch.zeros(batch, dtype=k_dtype)
    top_p = torch.ones(batch)
    min_p = torch.zeros(batch)
    rand_k = torch.randint(1, max(2, vocab // 2), (batch,), generator=rng).to(k_dtype)
    rand_p = 0.05 + 0.9 * torch.rand(batch, generator=rng)
    rand_min_p = 0.3 * torch.rand(batch, generator=rng)
    for b in range(batch):
        kind = b % 9
        if kind == 0:  # greedy, with filters that it must ignore
            temperature[b], top_k[b], top_p[b] = 0.0, rand_k[b], rand_p[b]
        elif kind == 1:
            top_k[b] = rand_k[b]
        elif kind == 2:
            top_p[b] = rand_p[b]
        elif kind == 3:
            min_p[b] = rand_min_p[b]
        elif kind == 4:
            top_k[b], top_p[b], min_p[b] = rand_k[b], rand_p[b], rand_min_p[b]
        elif kind == 6:  # disabled by edge values
            top_k[b], top_p[b] = vocab + 3, 1.0
        elif kind == 7:  # negative temperature is greedy
            temperature[b] = -1.0
        elif kind == 8:  # top-k of 1 and the tightest top-p
            top_k[b], top_p[b] = 1, 1e-6
        # kind 5: all filters disabled by their neutral values
    params = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    params = {name: t.to(device) for name, t in params.items()}
    params["seeds"] = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=rng).to(device)
    return params


def _assert_same_tokens(device: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.int64 and actual.shape == expected.shape
    if device == "cpu":
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)
    else:  # ulp-level differences in tl.log may flip near-ties: allow a few rows
        assert (actual != expected).sum().item() <= max(1, actual.numel() // 100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_sample_matches_reference(
    device: str, rng: torch.Generator, vocab: int, dtype: torch.dtype
) -> None:
    batch = 9
    logits = (3 * torch.randn(batch, vocab, generator=rng)).to(dtype).to(device)
    params = _row_params(batch, vocab, rng, device, torch.int64)
    tokens = tri.sample(logits, **params)
    _assert_same_tokens(device, tokens, ref.sample(logits, **params))
    assert ((tokens >= 0) & (tokens < vocab)).all()


@pytest.mark.parametrize("given", ["none", "top_k", "top_p", "min_p", "top_k+min_p"])
def test_sample_with_filters_left_out(device: str, rng: torch.Generator, given: str) -> None:
    batch, vocab = 18, 300
    logits = torch.randn(batch, vocab, generator=rng).to(device)
    params = _row_params(batch, vocab, rng, device, torch.int32)
    for name in ("top_k", "top_p", "min_p"):
        if name not in given.split("+"):
            del params[name]
    _assert_same_tokens(device, tri.sample(logits, **params), ref.sample(logits, **params))


def test_sample_single_row_and_strided_rows(device: str, rng: torch.Generator) -> None:
    vocab = BLOCK_V + 1
    buf = torch.randn(5, vocab + 13, generator=rng).to(torch.bfloat16).to(device)
    params = _row_params(5, vocab, rng, device, torch.int64)
    strided = buf[:, 5 : 5 + vocab]  # row stride vocab + 13
    _assert_same_tokens(device, tri.sample(strided, **params), ref.sample(strided, **params))
    for b in (0, 4):  # B=1: a greedy row, a row with every filter
        one = {name: t[b : b + 1] for name, t in params.items()}
        row = buf[b : b + 1, :vocab].contiguous()
        _assert_same_tokens(device, tri.sample(row, **one), ref.sample(row, **one))


def test_greedy_is_argmax_lowest_index_on_ties(device: str) -> None:
    vocab = 2 * BLOCK_V + 5
    logits = torch.zeros(4, vocab)
    logits[0, [3, BLOCK_V + 2]] = 5.0  # tie across tiles
    logits[1, [vocab - 1, vocab - 2]] = 1.0  # tie in the last, partial tile
    logits[2, :] = float("-inf")  # nothing finite: index 0, like torch.argmax
    logits[3, 7] = 1e-3
    temperature = torch.tensor([0.0, 0.0, 0.0, -2.0])
    seeds = torch.arange(4)
    for dtype in DTYPES:
        x = logits.to(dtype).to(device)
        tokens = tri.sample(x, temperature.to(device), seeds.to(device), top_k=None)
        assert tokens.cpu().tolist() == [3, vocab - 2, 0, 7]


def test_reproducible_and_seed_dependent(device: str, rng: torch.Generator) -> None:
    batch, vocab = 24, 1000
    logits = torch.zeros(batch, vocab, device=device)  # uniform: every token equally likely
    temperature = torch.ones(batch, device=device)
    seeds = torch.randint(0, 2**40, (batch,), generator=rng).to(device)
    first = tri.sample(logits, temperature, seeds)
    assert torch.equal(first, tri.sample(logits, temperature, seeds))
    # the noise depends on the seed only, not on the row: a repeated seed repeats the draw
    assert torch.equal(tri.sample(logits, temperature, seeds.flip(0)), first.flip(0))
    # each row repeats a token with probability 1/1000: more than 3 of 24 is ~1e-8
    assert (first == tri.sample(logits, temperature, seeds + 1)).sum().item() <= 3


def _expected_probs(
    temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """The exact (float64) filtered, renormalized distribution over LOGITS_8."""
    z = np.array(LOGITS_8) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-z)
    keep = np.ones(len(z), dtype=bool)
    if 0 < top_k < len(z):
        keep[order[top_k:]] = False
    if top_p < 1:
        renormalized = np.where(keep, probs, 0.0)[order] / probs[keep].sum()
        num = int(np.searchsorted(np.cumsum(renormalized), top_p)) + 1
        keep[order[num:]] = False
    keep &= probs >= min_p * probs.max()
    out = np.where(keep, probs, 0.0)
    result: np.ndarray = out / out.sum()
    return result


def _assert_frequencies(tokens: torch.Tensor, probs: np.ndarray) -> None:
    """Every count within a Bernstein bound (union over tokens: false alarm < FAILURE_PROB)."""
    n = tokens.numel()
    counts = np.bincount(tokens.cpu().numpy(), minlength=len(probs))
    assert len(counts) == len(probs)
    assert counts[probs == 0].sum() == 0, f"filtered tokens drawn: {counts} vs {probs}"
    log_term = math.log(2 * len(probs) / FAILURE_PROB)
    for count, p in zip(counts, probs, strict=True):
        variance = n * p * (1 - p)
        bound = log_term / 3 + math.sqrt((log_term / 3) ** 2 + 2 * variance * log_term)
        assert abs(count - n * p) <= bound, f"counts {counts} vs expected {n * probs}"


def _draw(
    fn: SampleFn, device: str, n: int, seeds: torch.Tensor, temperature: float, **filters: Any
) -> torch.Tensor:
    """``n`` draws from LOGITS_8: ``n`` identical rows (an expanded, stride-0 view)."""
    logits = torch.tensor(LOGITS_8, device=device).expand(n, len(LOGITS_8))
    kwargs = {
        name: torch.full((n,), value, dtype=torch.int64 if name == "top_k" else torch.float32)
        for name, value in filters.items()
    }
    kwargs = {name: t.to(device) for name, t in kwargs.items()}
    return fn(logits, torch.full((n,), temperature, device=device), seeds.to(device), **kwargs)


STAT_CASES = [
    pytest.param(1.0, {}, id="plain"),
    pytest.param(0.5, {}, id="cold"),
    pytest.param(2.0, {}, id="hot"),
    pytest.param(1.0, {"top_k": 3}, id="top_k"),
    pytest.param(1.0, {"top_p": 0.7}, id="top_p"),
    pytest.param(1.0, {"min_p": 0.12}, id="min_p"),
    # top-p on the top-k-renormalized distribution keeps 2 (on the raw one, it would keep 3)
    pytest.param(1.0, {"top_k": 3, "top_p": 0.8}, id="top_k+top_p"),
    # each filter bites: top-k 8 -> 5, top-p 5 -> 4, min-p 4 -> 3
    pytest.param(0.8, {"top_k": 5, "top_p": 0.9, "min_p": 0.2}, id="all"),
]


@pytest.mark.parametrize(("temperature", "filters"), STAT_CASES)
def test_frequencies_match_distribution(
    device: str, rng: torch.Generator, temperature: float, filters: dict[str, Any]
) -> None:
    # NOTE: interpreted, the kernel would need minutes; it equals the reference bit for bit.
    fn: SampleFn = tri.sample if device == "cuda" else ref.sample
    n = 20000
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=rng)
    tokens = _draw(fn, device, n, seeds, temperature, **filters)
    _assert_frequencies(tokens, _expected_probs(temperature, **filters))


def test_frequencies_with_consecutive_seeds(device: str) -> None:
    fn: SampleFn = tri.sample if device == "cuda" else ref.sample
    n = 20000
    tokens = _draw(fn, device, n, torch.arange(n) + 2**32 - 7, 1.0)
    _assert_frequencies(tokens, _expected_probs(1.0))


def test_kernel_frequencies(device: str, rng: torch.Generator) -> None:
    n = 20000 if device == "cuda" else 600  # the interpreter runs ~10 ms per row
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=rng)
    filters = {"top_k": 5, "top_p": 0.9, "min_p": 0.2}
    tokens = _draw(tri.sample, device, n, seeds, 0.8, **filters)
    _assert_frequencies(tokens, _expected_probs(0.8, **filters))


def _args(batch: int = 3, vocab: int = 10) -> dict[str, Any]:
    return {
        "logits": torch.randn(batch, vocab),
        "temperature": torch.ones(batch),
        "seeds": torch.arange(batch),
        "top_k": torch.zeros(batch, dtype=torch.int32),
        "top_p": torch.ones(batch),
        "min_p": torch.zeros(batch),
    }


BAD_ARGS: list[tuple[str, dict[str, Any]]] = [
    ("logits", {"logits": torch.randn(10)}),
    ("logits", {"logits": torch.randn(3, 10, 1)}),
    ("logits", {"logits": torch.randint(0, 5, (3, 10))}),
    ("logits", {"logits": torch.randn(10, 3).t()}),
    ("logits", {"logits": [[0.0] * 10] * 3}),
    ("logits", {**_args(batch=0)}),
    ("logits", {"logits": torch.randn(3, 0)}),
    ("temperature", {"temperature": torch.ones(4)}),
    ("temperature", {"temperature": torch.ones(3, 1)}),
    ("temperature", {"temperature": torch.ones(3, dtype=torch.float64)}),
    ("temperature", {"temperature": None}),
    ("seeds", {"seeds": torch.arange(3, dtype=torch.int32)}),
    ("seeds", {"seeds": torch.arange(2)}),
    ("seeds", {"seeds": torch.arange(3, device="meta")}),
    ("seeds", {"seeds": torch.arange(6)[::2]}),
    ("top_k", {"top_k": torch.zeros(3)}),
    ("top_k", {"top_k": torch.zeros(5, dtype=torch.int64)}),
    ("top_p", {"top_p": torch.ones(3, dtype=torch.float16)}),
    ("min_p", {"min_p": torch.zeros(1)}),
]


@pytest.mark.parametrize("fn", [tri.sample, ref.sample], ids=["triton", "reference"])
@pytest.mark.parametrize(("name", "override"), BAD_ARGS)
def test_bad_arguments_raise(
    device: str, fn: SampleFn, name: str, override: dict[str, Any]
) -> None:
    args = {**_args(), **override}
    args = {
        k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
        for k, v in args.items()
    }
    logits, temperature, seeds = args.pop("logits"), args.pop("temperature"), args.pop("seeds")
    with pytest.raises(ValueError, match=name):
        fn(logits, temperature, seeds, **args)


def test_cpu_tensor_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _args()
    with pytest.raises(ValueError, match="logits is on cpu"):
        tri.sample(args.pop("logits"), args.pop("temperature"), args.pop("seeds"), **args)


# ---- the CPU serving path: inverse-CDF draw, same distribution -------------------------------
@pytest.mark.parametrize(("temperature", "filters"), STAT_CASES)
def test_inverse_cdf_frequencies_match_distribution(
    rng: torch.Generator, temperature: float, filters: dict[str, Any]
) -> None:
    n = 20000
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=rng)
    tokens = _draw(ref.sample_inverse_cdf, "cpu", n, seeds, temperature, **filters)
    _assert_frequencies(tokens, _expected_probs(temperature, **filters))


def test_inverse_cdf_frequencies_with_consecutive_seeds() -> None:
    n = 20000
    tokens = _draw(ref.sample_inverse_cdf, "cpu", n, torch.arange(n) + 2**32 - 7, 1.0)
    _assert_frequencies(tokens, _expected_probs(1.0))


def test_inverse_cdf_reproducible_greedy_rows_and_batch_independent(rng: torch.Generator) -> None:
    logits = torch.randn(24, 1000, generator=rng) * 3
    temperature = torch.rand(24, generator=rng) + 0.5
    temperature[::5] = 0.0  # greedy rows
    seeds = torch.randint(-(2**63), 2**63 - 1, (24,), generator=rng)
    first = ref.sample_inverse_cdf(logits, temperature, seeds, top_p=torch.full((24,), 0.95))
    again = ref.sample_inverse_cdf(logits, temperature, seeds, top_p=torch.full((24,), 0.95))
    assert torch.equal(first, again)
    greedy = temperature == 0
    assert torch.equal(first[greedy], logits[greedy].argmax(-1))
    alone = ref.sample_inverse_cdf(logits[3:4], temperature[3:4], seeds[3:4],
                                   top_p=torch.full((1,), 0.95))  # fmt: skip
    assert alone.item() == first[3].item()
    assert (first != ref.sample_inverse_cdf(logits, temperature, seeds + 1)).any()


def test_inverse_cdf_never_draws_a_filtered_token_at_the_top_of_the_cdf() -> None:
    """u close to 1 must land on the last KEPT token, not on filtered tokens after it."""
    logits = torch.tensor([[5.0, 4.0, -50.0, -60.0]]).expand(4096, 4)
    seeds = torch.arange(4096)
    tokens = ref.sample_inverse_cdf(logits, torch.ones(4096), seeds, top_k=torch.full((4096,), 2))
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize(("name", "override"), BAD_ARGS)
def test_inverse_cdf_bad_arguments_raise(name: str, override: dict[str, Any]) -> None:
    args = {**_args(), **override}
    logits, temperature, seeds = args.pop("logits"), args.pop("temperature"), args.pop("seeds")
    with pytest.raises(ValueError, match=name):
        ref.sample_inverse_cdf(logits, temperature, seeds, **args)
