"""Paged prefill attention (Triton): chunks of new tokens against the paged KV cache.

One flat batch holds every sequence's chunk of new query tokens (``query_start_loc`` marks
them, as the native ``BatchBuilder`` lays them out); each sequence may already have a cached
prefix (prefix caching, or earlier chunks of a chunked prefill). The chunk's own keys and values
are written to the cache first (``write_kv_cache``), so every key is read from the cache through
the block table and the cached prefix needs no special case. The mask is causal on absolute
positions, with an optional sliding window.

Grid ``(cdiv(max_query_len, BLOCK_M), num_heads, num_seqs)``: a program owns ``BLOCK_M`` query
rows of one head of one sequence (programs past a sequence's chunk return at once) and walks the
keys from the window's start to its last row's position in ``BLOCK_N`` tiles (FlashAttention-2
style online softmax in fp32, exp2 domain).

NOTE: why not torch's SDPA? SDPA needs contiguous per-sequence K/V, so paged prefill through it
means a gather copy of every sequence's whole context per layer plus one SDPA call (or a padded
batch and a dense mask) per sequence; with prefix caching the copy is of the cached prefix too.
This kernel reads the cache in place and runs the whole ragged batch in one launch;
``bench/bench_kernels.py`` compares it with SDPA on contiguous inputs (SDPA's best case).

Reference: :func:`helixflow.kernels.reference.attention.paged_prefill_attention`.
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
from helixflow.kernels._utils import (
    INDEX_DTYPES,
    check_launchable,
    check_tensor,
    is_interpreter,
    next_power_of_2,
)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    sliding_window,  # 0: none
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt_seq,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    query_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    if tile * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - query_len  # tokens cached before this chunk

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < query_len
    q_pos = context_len + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_tok = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    hi = tl.minimum(context_len + (tile + 1) * BLOCK_M, seq_len)
    first_pos = context_len + tile * BLOCK_M
    lo = tl.where(sliding_window > 0, tl.maximum(first_pos - sliding_window + 1, 0), 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    cache_head = (head // GROUP) * stride_c_head
    for start in range(lo, hi, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        tok_ok = toks < hi
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
                            toks, tok_ok, dims, dim_ok, cache_head, stride_c_block, stride_c_tok,
                            BLOCK_SIZE, UPCAST)  # fmt: skip
        s = dot(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        allowed = tok_ok[None, :] & (toks[None, :] <= q_pos[:, None])
        in_window = toks[None, :] > q_pos[:, None] - sliding_window
        allowed = allowed & ((sliding_window == 0) | in_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with no allowed key yet (sliding window) keeps m == -inf: subtract 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_tok[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill attention: ``q [num_tokens, num_heads, head_dim]`` -> ``out`` of the same shape.

    ``query_start_loc [num_seqs + 1]`` int32 splits the flat rows into sequences; ``seq_lens
    [num_seqs]`` counts each sequence's tokens including its chunk (so its cached prefix is
    ``seq_lens - query_len``). ``max_query_len`` (a host-side bound, known to the batch builder)
    sizes the grid; without it one ``.item()`` sync computes it. Rows past
    ``query_start_loc[-1]`` are not written.
    """
    q = check_query(q)
    check_launchable(q, "q")
    query_start_loc = check_tensor("query_start_loc", query_start_loc, ndim=1,
                                   dtypes=INDEX_DTYPES, device=q.device)  # fmt: skip
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc must have num_seqs + 1 >= 1 entries")
    num_kv_heads, block_size = check_paged_cache(q, key_cache, value_cache, block_tables,
                                                 seq_lens, num_seqs)  # fmt: skip
    check_options(scale, sliding_window)
    out = output_for(q, out, zeros=True)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_seqs else 0
    elif max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")
    if num_seqs == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out

    num_heads, head_dim = q.shape[1], q.shape[2]
    head_dim_pad = next_power_of_2(head_dim)
    block_m = 32 if head_dim_pad >= 256 else 64
    block_n = 32 if head_dim_pad >= 256 else 64
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=is_interpreter() and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        # NOTE: fp32 tiles with two stages need ~115 KB of shared memory, more than consumer
        # GPUs (~99 KB) give a block; one stage halves it.
        num_warps=4, num_stages=1 if q.dtype == torch.float32 else 2, enable_fp_fusion=True,
    )  # fmt: skip
    return out
