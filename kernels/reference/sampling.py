"""Torch reference of batched token sampling: temperature, top-k, top-p, min-p, Gumbel-max draw.

One draw per row of ``logits`` ``[B, V]``. Every row has its own temperature, seed and filters:

- ``temperature[b] > 0`` samples from ``softmax(logits[b] / temperature[b])`` after the filters;
  any other value (0, negative, NaN) makes the row greedy: the argmax of the raw logits, lowest
  index on ties, every filter ignored.
- top-k keeps the ``k`` largest scaled logits (``k <= 0`` or ``k >= V`` disables it); top-p is
  then applied to the top-k-renormalized distribution: it keeps the smallest prefix of the
  descending-sorted tokens whose cumulative probability reaches ``p`` (``p >= 1`` disables it,
  at least one token always stays); min-p keeps the tokens whose probability is at least
  ``min_p * max_prob`` (``min_p <= 0`` disables it).
- All three filters become ONE logit threshold per row (:func:`sampling_thresholds`): a token is
  kept iff its scaled logit is ``>= threshold``. Tokens that tie with the threshold are all kept,
  so a top-k row with ties at the k-th value may keep more than ``k`` tokens.
- The draw is Gumbel-max: ``argmax_j (scaled_j + g_j)`` over the kept tokens, where ``g_j`` is
  Gumbel noise made from Triton's Philox counter RNG (:func:`philox_randint`) keyed by the row's
  seed and counted by the vocabulary index. This module reproduces that RNG bit for bit in numpy,
  so the reference and the Triton kernel draw the same token from the same seed.

This module is also the CPU path of the dispatch layer; it imports no Triton.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from helixflow.kernels._utils import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor

# Triton's 32-bit Philox-4x32 constants (triton/language/random.py) and its default round count.
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

# NOTE: the uniform keeps the top 23 of the 32 random bits: u = (m + 0.5) * 2**-23 with
# m < 2**23 needs at most 24 significant bits, so it is exact in fp32 and lies in the OPEN
# interval (0, 1). With 24 bits, m + 0.5 rounds to 2**24 for the largest m, giving u == 1.0 and
# Gumbel noise +inf (about 1 token in 2**24, ~1% of draws over a 128k vocabulary).
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0**-23

_MASK32 = np.uint64(0xFFFFFFFF)


def philox_randint(seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Triton's ``tl.randint(seed, offset)`` in numpy: uint32 ``[len(seeds), len(offsets)]``.

    ``seeds`` are int64 (negative ones by their bit pattern, as ``seed.to(tl.uint64)`` does);
    their low and high 32 bits are the Philox key ``(k0, k1)``. ``offsets`` give the counter:
    ``c0`` = the low 32 bits, ``c1`` = the high 32 bits for int64 offsets and 0 for int32 ones,
    ``c2 = c3 = 0``. The result is ``c0`` after ten rounds.
    """
    # NOTE: all arithmetic is on uint64 arrays holding 32-bit values: the product of two
    # uint32 fits in uint64 exactly (hi = p >> 32, lo = p & mask), and array ops never warn.
    seed_bits = np.asarray(seeds, dtype=np.int64).view(np.uint64)[:, None]
    offsets = np.asarray(offsets)
    offset_bits = offsets.astype(np.int64).view(np.uint64)[None, :]
    shape = (seed_bits.shape[0], offset_bits.shape[1])
    k0 = np.broadcast_to(seed_bits & _MASK32, shape)
    k1 = np.broadcast_to(seed_bits >> np.uint64(32), shape)
    c0 = np.broadcast_to(offset_bits & _MASK32, shape)
    if offsets.dtype.itemsize > 4:
        c1 = np.broadcast_to(offset_bits >> np.uint64(32), shape)
    else:
        c1 = np.zeros(shape, dtype=np.uint64)
    c2 = np.zeros(shape, dtype=np.uint64)
    c3 = np.zeros(shape, dtype=np.uint64)
    round_a, round_b = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    key_a, key_b = np.uint64(PHILOX_KEY_A), np.uint64(PHILOX_KEY_B)
    for _ in range(PHILOX_ROUNDS):
        prod_a = round_a * c0  # A * c0, 64-bit exact
        prod_b = round_b * c2  # B * c2, 64-bit exact
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & _MASK32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + key_a) & _MASK32
        k1 = (k1 + key_b) & _MASK32
    return c0.astype(np.uint32)


def gumbel_from_bits(bits: np.ndarray) -> np.ndarray:
    """fp32 Gumbel noise from uint32 random bits, exactly as the kernel computes it.

    ``u = ((bits >> 9) + 0.5) * 2**-23`` is exact and in (0, 1); ``g = -log(-log(u))`` is
    finite, within about [-2.8, 16.6].
    """
    mantissa = (np.asarray(bits, dtype=np.uint32) >> np.uint32(UNIFORM_SHIFT)).astype(np.float32)
    u = (mantissa + np.float32(0.5)) * np.float32(UNIFORM_SCALE)
    noise: np.ndarray = -np.log(-np.log(u))
    return noise


def gumbel_noise(seeds: np.ndarray, vocab_size: int) -> np.ndarray:
    """The kernel's fp32 Gumbel noise ``[len(seeds), vocab_size]`` for each seed's row.

    Token ``j`` of a row gets :func:`gumbel_from_bits` of ``tl.randint(seed, j)``, ``j`` int32.
    """
    return gumbel_from_bits(philox_randint(seeds, np.arange(vocab_size, dtype=np.int32)))


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """fp32 ``1 / temperature`` for sampled rows and 1 for greedy rows (``temperature <= 0``).

    NOTE: the host computes it once (IEEE division in torch) and the kernel multiplies by it, so
    kernel and reference scale the logits with bit-identical products; no division on the device.
    """
    sampled = temperature > 0
    return torch.where(sampled, 1.0 / temperature, torch.ones_like(temperature))


def sampling_thresholds(
    scaled_logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """One fp32 logit threshold per row ``[B]`` that implements top-k, top-p and min-p together.

    ``scaled_logits`` ``[B, V]`` fp32 are the temperature-scaled logits. Keep a token iff its
    scaled logit is ``>= threshold``; ``-inf`` keeps everything (no filter on that row). Batched
    torch ops only: no host sync, no per-row loop; the sort runs only if top-k or top-p is given.
    """
    batch, vocab = scaled_logits.shape
    device = scaled_logits.device
    threshold = torch.full((batch,), float("-inf"), dtype=torch.float32, device=device)
    if top_k is not None or top_p is not None:
        ranked = torch.sort(scaled_logits, dim=-1, descending=True).values  # [B, V]
        num_kept = torch.full((batch,), vocab, dtype=torch.int64, device=device)
        if top_k is not None:
            k = top_k.to(torch.int64)
            k_on = (k > 0) & (k < vocab)
            num_kept = torch.where(k_on, k, num_kept)
            kth = ranked.gather(1, (num_kept - 1)[:, None]).squeeze(1)
            threshold = torch.where(k_on, kth, threshold)
        if top_p is not None:
            positions = torch.arange(vocab, device=device)
            in_top_k = positions[None, :] < num_kept[:, None]
            probs = torch.softmax(torch.where(in_top_k, ranked, float("-inf")), dim=-1)
            # NOTE: exclusive prefix sums (probability mass strictly before each token) are
            # monotone, so "mass before < p" selects a prefix; the token that reaches p is in it.
            mass_before = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
            num_p = (mass_before < top_p[:, None]).sum(dim=-1).clamp(1, vocab)
            pth = ranked.gather(1, (num_p - 1)[:, None]).squeeze(1)
            # NOTE: p >= 1 is disabled explicitly: fp32 cumsums can reach 1 before the tail and
            # would otherwise drop tokens of tiny probability.
            threshold = torch.where(top_p < 1, torch.maximum(threshold, pth), threshold)
    if min_p is not None:
        row_max = scaled_logits.amax(dim=-1)
        # prob_j >= min_p * max_prob  <=>  scaled_j >= max + log(min_p); log(0) = -inf disables.
        min_p_threshold = row_max + torch.log(min_p.clamp(min=0))
        threshold = torch.maximum(threshold, min_p_threshold)
    return threshold


def check_sample_args(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> None:
    """Shapes, dtypes, devices and layouts of :func:`sample`'s arguments; ValueError if wrong.

    Values are NOT checked (that would sync the host with the device): a non-positive temperature
    means greedy, out-of-range filter values disable the filter or clamp as documented above.
    """
    check_tensor(
        "logits", logits, ndim=2, dtypes=FLOAT_DTYPES, contiguous=False, last_dim_contiguous=True
    )
    batch, vocab = logits.shape
    if batch < 1:
        raise ValueError(f"logits must have at least one row, got shape {tuple(logits.shape)}")
    if vocab < 1:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    if vocab >= 2**31:
        raise ValueError(f"logits must have fewer than 2**31 columns, got {vocab}")
    device = logits.device
    row_args: list[tuple[str, torch.Tensor | None, tuple[torch.dtype, ...]]] = [
        ("temperature", temperature, (torch.float32,)),
        ("seeds", seeds, (torch.int64,)),
        ("top_k", top_k, INDEX_DTYPES),
        ("top_p", top_p, (torch.float32,)),
        ("min_p", min_p, (torch.float32,)),
    ]
    for name, t, dtypes in row_args:
        if t is None:
            if name in ("temperature", "seeds"):
                raise ValueError(f"{name} must be a torch.Tensor, got None")
            continue
        check_tensor(name, t, ndim=1, dtypes=dtypes, device=device)
        check_shape(name, t, (batch,))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row: int64 ``[B]`` (see the module docstring for the semantics).

    ``logits`` ``[B, V]`` fp32/fp16/bf16 (rows may be strided, unit stride along V);
    ``temperature`` ``[B]`` fp32 (``<= 0``: greedy); ``seeds`` ``[B]`` int64, one per row for
    this draw; ``top_k`` ``[B]`` int32/int64, ``top_p`` and ``min_p`` ``[B]`` fp32, or None to
    disable that filter on every row. NaN logits give an unspecified token.
    """
    tokens, rows, scaled, threshold = _split_rows(logits, temperature, seeds, top_k, top_p, min_p)
    if rows.numel() == 0:
        return tokens
    vocab = logits.shape[1]
    noise = torch.from_numpy(gumbel_noise(seeds[rows].cpu().numpy(), vocab)).to(logits.device)
    perturbed = torch.where(scaled >= threshold[:, None], scaled + noise, float("-inf"))
    tokens[rows] = perturbed.argmax(dim=-1)  # first index on ties, like the kernel
    return tokens


def _split_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks, then what both draws start from: ``tokens`` [B] already holding every row's
    greedy argmax, the sampled ``rows`` [R], their temperature-scaled logits [R, V] and their
    filter thresholds [R].

    NOTE: finding the sampled rows syncs with the device; the draws sync anyway (their random
    numbers are made on the host), and skipping greedy rows saves noise over whole vocabularies.
    """
    check_sample_args(logits, temperature, seeds, top_k, top_p, min_p)
    raw = logits.float()  # [B, V]; exact for fp16/bf16
    tokens = raw.argmax(dim=-1)  # greedy rows: lowest index on ties
    rows = (temperature > 0).nonzero().flatten()
    scaled = raw[rows] * inverse_temperature(temperature[rows])[:, None]
    filters = [None if f is None else f[rows] for f in (top_k, top_p, min_p)]
    return tokens, rows, scaled, sampling_thresholds(scaled, *filters)


def sample_inverse_cdf(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sample`'s distribution from ONE random number per row: the CPU serving path.

    Same arguments, filters and greedy rule as :func:`sample`, but the draw inverts the kept
    tokens' cumulative distribution at ``u = uniform(philox(seed, 0))`` instead of adding Gumbel
    noise to every logit: a few passes over the vocabulary instead of ten Philox rounds per
    token (~0.6 s per step of 64 rows of 49k tokens in numpy). Reproducible for a seed, but a
    seed draws a different token here than in :func:`sample` and the Triton kernel.
    """
    tokens, rows, scaled, threshold = _split_rows(logits, temperature, seeds, top_k, top_p, min_p)
    if rows.numel() == 0:
        return tokens
    kept = torch.where(scaled >= threshold[:, None], scaled, float("-inf"))
    cdf = torch.softmax(kept, dim=-1).cumsum(dim=-1)  # [R, V]; flat over dropped tokens
    bits = philox_randint(seeds[rows].cpu().numpy(), np.zeros(1, dtype=np.int32))[:, 0]
    u = torch.from_numpy((bits >> np.uint32(UNIFORM_SHIFT)).astype(np.float32)) + 0.5
    total = cdf[:, -1:]
    # NOTE: u in (0, 1) puts x strictly below the total mass, but the product can round up to
    # it; the clamp keeps x below, so the first cdf entry above x is a kept token's.
    x = torch.minimum(u.to(cdf.device)[:, None] * UNIFORM_SCALE * total,
                      torch.nextafter(total, torch.zeros_like(total)))  # fmt: skip
    tokens[rows] = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    return tokens
