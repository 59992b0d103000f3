"""Reference attention over the paged KV cache: decode (one query token) and prefill (a chunk).

Both read keys and values only from the cache (the step's own keys are written first), through
a block table per sequence. A sequence of ``seq_len`` tokens whose last ``query_len`` tokens are
the queries puts query ``i`` at position ``seq_len - query_len + i``; it attends causally to the
keys at positions ``<=`` its own, and with a sliding window ``w`` only to the last ``w`` of those
(keys at positions ``> pos - w``, the Mistral convention). GQA/MQA: query head ``h`` reads KV
head ``h // (num_heads // num_kv_heads)``.

The math is plain fp32 (gather, matmul, masked softmax, matmul), rounded once to ``q.dtype``.
"""

from __future__ import annotations

import torch


def _gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Contiguous copies of each sequence's cached rows: ``[num_seqs, max_len, kv_heads, dim]``.

    Block-table entries past a sequence's last block may be stale, so they are replaced by
    block 0 before the gather and the rows they produce are masked out by the caller.
    """
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    used = -(-seq_lens.long() // block_size)  # [num_seqs]
    cols = torch.arange(num_blocks, device=tables.device)
    tables = torch.where(cols[None, :] < used[:, None], tables, torch.zeros_like(tables))
    rows = cache[tables]  # [num_seqs, num_blocks, block_size, kv_heads, dim]
    return rows.flatten(1, 2)[:, :max_len]


def _attend(
    q: torch.Tensor,  # [num_seqs, max_q, heads, dim], zero rows for padding
    query_lens: torch.Tensor,  # [num_seqs]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_seqs, max_q, num_heads, _ = q.shape
    num_kv_heads = key_cache.shape[2]
    max_len = max(int(seq_lens.max()), 1) if num_seqs else 1
    k = _gather_kv(key_cache, block_tables, seq_lens, max_len).float()
    v = _gather_kv(value_cache, block_tables, seq_lens, max_len).float()
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [seqs, heads, max_len, dim]
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    qf = q.float().transpose(1, 2)  # [seqs, heads, max_q, dim]
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [seqs, heads, max_q, max_len]

    lens = seq_lens.long()[:, None, None]
    offsets = torch.arange(max_q, device=q.device)[None, :, None]
    q_pos = lens - query_lens.long()[:, None, None] + offsets
    k_pos = torch.arange(max_len, device=q.device)[None, None, :]
    allowed = (k_pos <= q_pos) & (k_pos < lens)
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key at all -> 0
    out = torch.matmul(probs, v)  # [seqs, heads, max_q, dim]
    return out.transpose(1, 2)


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
    """One query token per sequence: ``q [num_seqs, num_heads, head_dim]`` -> same shape.

    ``max_seq_len`` and ``num_splits`` are launch hints of the Triton kernel, ignored here.
    A sequence with ``seq_len == 0`` (padding) gets zeros.
    """
    del max_seq_len, num_splits
    ones = torch.ones(q.shape[0], dtype=torch.long, device=q.device)
    result = _attend(
        q[:, None], ones, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window
    )[:, 0].to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


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
    """A flat batch of query chunks: ``q [num_tokens, num_heads, head_dim]`` -> same shape.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s + 1]`` and has
    ``seq_lens[s]`` tokens in the cache (its cached prefix plus the chunk). Rows after
    ``query_start_loc[-1]`` (padding) are left untouched in ``out`` (zeros when it is made here).
    """
    del max_query_len
    num_seqs = seq_lens.shape[0]
    starts = query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]
    max_q = max(int(query_lens.max()), 1) if num_seqs else 1
    padded = q.new_zeros(num_seqs, max_q, q.shape[1], q.shape[2])
    for s in range(num_seqs):
        a, b = int(starts[s]), int(starts[s + 1])
        padded[s, : b - a] = q[a:b]
    att = _attend(
        padded, query_lens, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window
    )
    result = out if out is not None else torch.zeros_like(q)
    for s in range(num_seqs):
        a, b = int(starts[s]), int(starts[s + 1])
        result[a:b] = att[s, : b - a].to(result.dtype)
    return result
