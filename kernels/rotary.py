"""Rotary position embedding (RoPE) applied in place to q and k, as one Triton kernel.

Same function and semantics as ``helixflow.kernels.reference.rotary.rotary_embedding``; the
cos/sin cache it reads comes from ``helixflow.kernels.reference.rotary.rope_cos_sin_cache``
(re-exported here).

Grid: one program per token, rotating all of the token's q heads and then all of its k heads,
``BLOCK_*_HEADS`` heads at a time. NOTE: the token's cos/sin row is loaded once and reused for
every head (a grid over heads would reload it per program), and a token's q and k (a few KB) are
enough work for one program; a prefill's thousands of tokens fill the GPU, and a small decode
batch is bound by launch latency whatever the grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._utils import check_launchable, check_tensor, next_power_of_2
from helixflow.kernels.reference.rotary import check_rotary_args, rope_cos_sin_cache

__all__ = ["rope_cos_sin_cache", "rotary_embedding"]

# NOTE: each head tile holds at most this many (x1, x2) pairs: 32 heads of head_dim 128.
MAX_TILE_PAIRS = 2048


@triton.jit
def _rotate_heads(
    base_ptr,
    head_stride,
    num_heads,
    cos,
    sin,
    x1_offs,
    x2_offs,
    pair_mask,
    BLOCK_HEADS: tl.constexpr,
):
    """Rotate ``num_heads`` heads starting at ``base_ptr``, ``BLOCK_HEADS`` at a time, in place."""
    heads = tl.arange(0, BLOCK_HEADS)
    for start in range(0, num_heads, BLOCK_HEADS):
        head_offs = (start + heads).to(tl.int64) * head_stride
        mask = ((start + heads) < num_heads)[:, None] & pair_mask[None, :]
        x1_ptrs = base_ptr + head_offs[:, None] + x1_offs[None, :]
        x2_ptrs = base_ptr + head_offs[:, None] + x2_offs[None, :]
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x2_ptrs, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(x1_ptrs, out1.to(base_ptr.dtype.element_ty), mask=mask)
        tl.store(x2_ptrs, out2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cache_stride,
    num_q_heads,
    num_k_heads,
    HALF_DIM: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Rotate every q and k head of token ``program_id(0)`` by its position's cos/sin row."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_PAIRS)
    pair_mask = pairs < HALF_DIM
    cache_row = cache_ptr + pos * cache_stride
    cos = tl.load(cache_row + pairs, mask=pair_mask, other=0.0)
    sin = tl.load(cache_row + HALF_DIM + pairs, mask=pair_mask, other=0.0)
    if IS_NEOX:
        # Pair i with i + head_dim / 2 ("rotate half").
        x1_offs = pairs
        x2_offs = pairs + HALF_DIM
    else:
        # NOTE: GPT-J pairs 2i with 2i + 1: two stride-2 loads hitting the same cache lines.
        x1_offs = 2 * pairs
        x2_offs = 2 * pairs + 1
    _rotate_heads(
        q_ptr + token * q_token_stride,
        q_head_stride,
        num_q_heads,
        cos,
        sin,
        x1_offs,
        x2_offs,
        pair_mask,
        BLOCK_Q_HEADS,
    )
    _rotate_heads(
        k_ptr + token * k_token_stride,
        k_head_stride,
        num_k_heads,
        cos,
        sin,
        x1_offs,
        x2_offs,
        pair_mask,
        BLOCK_K_HEADS,
    )


def _block_heads(num_heads: int, block_pairs: int) -> int:
    """Heads per tile: all of them when they fit in ``MAX_TILE_PAIRS``, else a power of 2."""
    return max(1, min(int(next_power_of_2(num_heads)), MAX_TILE_PAIRS // block_pairs))


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> None:
    """Rotate q and k in place by the angles of each token's position (fp32 math, one rounding).

    positions: [num_tokens] int32/int64, contiguous; q: [num_tokens, num_heads, head_dim] and
    k: [num_tokens, num_kv_heads, head_dim] of one float dtype, unit stride in head_dim only (so
    slices of a fused qkv output work in place); cos_sin_cache: fp32 [max_position, head_dim]
    from ``rope_cos_sin_cache``, unit stride in its last dimension. ``is_neox`` pairs element i
    with i + head_dim / 2 (Llama "rotate half"), otherwise 2i with 2i + 1 (GPT-J).

    Every position must lie in ``[0, max_position)``: checking that would need a device-to-host
    sync, so it is the caller's contract; an out-of-range position reads outside the cache.
    """
    positions, q, k, cos_sin_cache = check_rotary_args(positions, q, k, cos_sin_cache)
    check_launchable(q, "q")
    check_tensor("positions", positions)
    check_tensor("q", q, contiguous=False, last_dim_contiguous=True)
    check_tensor("k", k, contiguous=False, last_dim_contiguous=True)
    check_tensor("cos_sin_cache", cos_sin_cache, contiguous=False, last_dim_contiguous=True)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.size(1)
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_pairs = next_power_of_2(half)
    _rotary_embedding_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        num_kv_heads,
        HALF_DIM=half,
        BLOCK_PAIRS=block_pairs,
        BLOCK_Q_HEADS=_block_heads(num_heads, block_pairs),
        BLOCK_K_HEADS=_block_heads(num_kv_heads, block_pairs),
        IS_NEOX=bool(is_neox),
        num_warps=4,
        enable_fp_fusion=True,
    )
