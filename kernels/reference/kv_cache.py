"""Reference of the KV-cache write: a step's keys and values into their cache slots.

The paged cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``
(keys and values). A slot is ``block_id * block_size + offset``; the native ``BatchBuilder``
produces one slot per token and ``-1`` for padded tokens, which are skipped.
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping``.

    ``slot_mapping`` is ``[num_tokens]`` int64; a negative slot (padding) is skipped. Slots must
    be distinct and below ``num_blocks * block_size``.
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    slots = slot_mapping.long()
    keep = slots >= 0
    # NOTE: boolean indexing syncs on CUDA; this is the CPU path and the tests' oracle.
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    flat_k[slots[keep]] = key[keep].to(key_cache.dtype)
    flat_v[slots[keep]] = value[keep].to(value_cache.dtype)
