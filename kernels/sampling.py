"""Triton batched token sampling: one fused pass per row, Gumbel-max over the kept tokens.

Semantics (temperature, greedy rows, the top-k / top-p / min-p threshold, tie rules, the Philox
noise) are defined by :mod:`helixflow.kernels.reference.sampling`; this kernel draws the same
token from the same seed. The host computes ``1 / temperature`` and, when a filter is given, the
per-row logit threshold with batched torch ops (one sort if top-k or top-p is given, none for
min-p alone, nothing at all without filters); the kernel then reads the row once in tiles of
``BLOCK_V``, adds Philox-keyed Gumbel noise to the kept scaled logits and keeps a running
max/argmax in fp32. Nothing syncs the host with the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._utils import check_launchable, is_interpreter, next_power_of_2
from helixflow.kernels.reference.sampling import (
    UNIFORM_SCALE,
    UNIFORM_SHIFT,
    check_sample_args,
    inverse_temperature,
    sampling_thresholds,
)

_UNIFORM_SHIFT = tl.constexpr(UNIFORM_SHIFT)
_UNIFORM_SCALE = tl.constexpr(UNIFORM_SCALE)

# NOTE: the interpreter runs each tile as numpy ops, so a smaller cap there mostly exercises the
# multi-tile loop in the tests; on a GPU 4096 fp32 values + indices stay in registers.
_MAX_BLOCK_V_GPU = 4096
_MAX_BLOCK_V_INTERPRETER = 1024


@triton.jit
def _gumbel_noise(seed, cols):
    """fp32 Gumbel noise for the int32 vocabulary indices ``cols`` of the row keyed by ``seed``.

    ``u = ((r >> 9) + 0.5) * 2**-23`` is exact in fp32 and lies in the open interval (0, 1), so
    ``-log(-log(u))`` is always finite (see ``UNIFORM_SHIFT`` in the reference).
    """
    bits = tl.randint(seed, cols)  # uint32, Philox-4x32, 10 rounds; int32 offsets: c1 = 0
    u = ((bits >> _UNIFORM_SHIFT).to(tl.float32) + 0.5) * _UNIFORM_SCALE
    return -tl.log(-tl.log(u))


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V] fp32/fp16/bf16, row stride `stride_row`, unit stride along V
    temperature_ptr,  # [B] fp32; <= 0 (or NaN) means greedy
    inv_temperature_ptr,  # [B] fp32, 1 / temperature (1 on greedy rows)
    threshold_ptr,  # [B] fp32 kept-logit threshold; read only when HAS_THRESHOLD
    seeds_ptr,  # [B] int64
    out_ptr,  # [B] int64
    vocab_size,
    stride_row,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    sampled = tl.load(temperature_ptr + row) > 0
    inv_temperature = tl.load(inv_temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    threshold = tl.load(threshold_ptr + row) if HAS_THRESHOLD else float("-inf")

    lanes = tl.arange(0, BLOCK_V)
    # Running per-lane max and its index; strict ">" keeps the lowest index on ties, because each
    # lane sees increasing indices. The initial index is a real index, so a row whose values are
    # all -inf returns 0 like torch.argmax.
    best_val = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    best_idx = lanes
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + lanes  # int32 vocabulary indices, also the Philox counters
        in_vocab = cols < vocab_size
        logit = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
        scaled = logit * inv_temperature  # == logit on greedy rows (inv_temperature = 1)
        # NOTE: the Philox rounds (~60 integer ops per token) cost more than reading the logit,
        # so greedy rows (a uniform branch per program) skip the noise entirely.
        if sampled:
            noise = _gumbel_noise(seed, cols)
            val = tl.where(scaled >= threshold, scaled + noise, float("-inf"))
        else:
            val = scaled
        better = val > best_val
        best_val = tl.where(better, val, best_val)
        best_idx = tl.where(better, cols, best_idx)

    top = tl.max(best_val, axis=0)
    token = tl.min(tl.where(best_val == top, best_idx, vocab_size), axis=0)
    tl.store(out_ptr + row, token.to(tl.int64))


def _launch_config(vocab_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab_size`` tokens."""
    cap = _MAX_BLOCK_V_INTERPRETER if is_interpreter() else _MAX_BLOCK_V_GPU
    block_v = min(next_power_of_2(vocab_size), cap)
    num_warps = max(1, min(8, block_v // 256))
    return block_v, num_warps


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits``: int64 ``[B]``, no host sync.

    ``logits`` ``[B, V]`` fp32/fp16/bf16 (rows may be strided, e.g. an ``expand``-ed row; unit
    stride along V); ``temperature`` ``[B]`` fp32, ``<= 0`` makes the row greedy (argmax of the
    raw logits, lowest index on ties, filters ignored); ``seeds`` ``[B]`` int64, a fresh one per
    row and draw; ``top_k`` ``[B]`` int32/int64 (``<= 0`` or ``>= V`` disables), ``top_p`` ``[B]``
    fp32 (``>= 1`` disables), ``min_p`` ``[B]`` fp32 (``<= 0`` disables); ``None`` disables a
    filter on every row and skips its host-side work. Tokens tying with a filter's cut-off are
    all kept. Raises ValueError for a wrong shape, dtype, device or layout (values are not
    checked: that would sync).
    """
    check_sample_args(logits, temperature, seeds, top_k, top_p, min_p)
    check_launchable(logits, "logits")
    batch, vocab = logits.shape
    inv_temperature = inverse_temperature(temperature)  # [B] fp32
    has_threshold = top_k is not None or top_p is not None or min_p is not None
    if has_threshold:
        scaled = logits.float() * inv_temperature[:, None]  # [B, V], as the kernel scales
        threshold = sampling_thresholds(scaled, top_k, top_p, min_p)  # [B]
    else:
        threshold = inv_temperature  # NOTE: a placeholder pointer, never read
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    block_v, num_warps = _launch_config(vocab)
    # NOTE: enable_fp_fusion=False keeps `logit * inv_temperature + noise` a multiply and an
    # add rounded separately, like the reference, instead of one FMA; the interpreter ignores it.
    _sample_kernel[(batch,)](
        logits,
        temperature,
        inv_temperature,
        threshold,
        seeds,
        out,
        vocab,
        logits.stride(0),
        HAS_THRESHOLD=has_threshold,
        BLOCK_V=block_v,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out
