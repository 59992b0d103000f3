"""Paged decode attention (Triton): one query token per sequence against its cached keys.

Grid ``(num_seqs, num_kv_heads, num_splits)``. A program loads the ``group = num_heads //
num_kv_heads`` query heads that share one KV head as the rows of a tile (padded to 16 for
``tl.dot``), so each key/value row is read from memory once per group, not once per query head
(GQA/MQA cost what their KV size says). It walks its share of the sequence in tiles of
``BLOCK_N`` tokens, gathering each token's row through the block table, with an online softmax
in fp32 (exp2 domain).

Split-K: with few sequences (one long sequence is the extreme) ``num_seqs * num_kv_heads``
programs cannot fill the GPU, so each sequence's keys are cut into ``num_splits`` ranges of
``cdiv(kv_len, num_splits)`` tokens, computed per sequence on the device. Each split writes a
normalised partial output plus its running max and sum; ``_reduce_splits_kernel`` rescales and
adds them. ``num_splits`` is the only host-side choice, so a CUDA graph captured for one batch
shape stays valid as the sequences grow.

Reference: :func:`helixflow.kernels.reference.attention.paged_decode_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._attention import (
    LOG2E,
    check_options,
    check_paged_cache,
    check_query,
    dot,
    load_kv_tile,
    output_for,
)
from helixflow.kernels._utils import check_launchable, is_interpreter, next_power_of_2


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_stats_ptr,
    qk_scale,  # softmax scale * log2(e)
    sliding_window,  # 0: none
    stride_q_seq, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt_seq,
    stride_o_seq, stride_o_head,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows  # query heads of this group
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [GROUP_PAD, HEAD_DIM_PAD]
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    cache_head = kv_head * stride_c_head
    for start in range(lo, hi, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        tok_ok = toks < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
                            toks, tok_ok, dims, dim_ok, cache_head, stride_c_block, stride_c_tok,
                            BLOCK_SIZE, UPCAST)  # fmt: skip
        s = dot(q, tl.trans(k), IEEE) * qk_scale  # [GROUP_PAD, BLOCK_N], log2 domain
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m = m_new

    # A sequence (or split) with no keys leaves l == 0: its output is zero, not NaN.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
    else:
        # part_out: [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD]; stats: [..., NUM_SPLITS, 2]
        part = (seq * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], out,
                 mask=row_ok[:, None])  # fmt: skip
        tl.store(part_stats_ptr + part * 2, m, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_stats_ptr, out_ptr,
    stride_o_seq, stride_o_head,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_ok = splits < NUM_SPLITS
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    m = tl.load(part_stats_ptr + part * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(part_stats_ptr + part * 2 + 1, mask=split_ok, other=0.0)  # noqa: E741
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty
    w = tl.exp2(m - m_max) * l  # empty splits: exp2(-inf) * 0 = 0
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :],
                    mask=split_ok[:, None], other=0.0)  # fmt: skip
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)  # fmt: skip


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4  # the interpreter: small, so the tests exercise split-K


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, device: torch.device, max_seq_len: int | None = None
) -> int:
    """Split-K factor: enough programs for ~2 waves of the GPU, each split >= 256 keys."""
    programs = max(num_seqs * num_kv_heads, 1)
    wanted = -(-2 * _num_sms(device) // programs)
    if max_seq_len is not None:
        wanted = min(wanted, -(-max_seq_len // 256))
    return max(1, min(wanted, 64))


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: ``q [num_seqs, num_heads, head_dim]`` -> ``out`` of the same shape.

    ``key_cache``/``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, same
    dtype as ``q``; ``block_tables [num_seqs, max_blocks]`` int32 (entries past a sequence's
    last block are never read); ``seq_lens [num_seqs]`` int32 (0 = padding row, gets zeros).
    ``max_seq_len`` (a host-side upper bound, e.g. from the batch builder) only tunes the split
    count; ``num_splits`` forces it. Nothing here syncs with the device.
    """
    q = check_query(q)
    check_launchable(q, "q")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = check_paged_cache(q, key_cache, value_cache, block_tables,
                                                 seq_lens, num_seqs)  # fmt: skip
    check_options(scale, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, q.device, max_seq_len)
    elif not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    out = output_for(q, out, zeros=False)
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    head_dim_pad = next_power_of_2(head_dim)
    # NOTE: the interpreter's tl.dot mis-handles bfloat16, so it computes in fp32 there.
    upcast = is_interpreter() and q.dtype == torch.bfloat16
    block_n = 32 if head_dim_pad >= 256 else 64
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad,
                               dtype=torch.float32, device=q.device)  # fmt: skip
        part_stats = torch.empty(num_seqs, num_heads, num_splits, 2, dtype=torch.float32,
                                 device=q.device)  # fmt: skip
    else:
        part_out = part_stats = out  # unused
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_stats,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        UPCAST=upcast, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2, enable_fp_fusion=True,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_out, part_stats, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=next_power_of_2(num_splits),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            num_warps=4, enable_fp_fusion=True,
        )  # fmt: skip
    return out
