"""KV-cache write: the step's keys and values into their paged-cache slots (Triton).

Cache layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for keys and the
same for values. One program per token copies all of its KV heads; a slot of ``-1`` (a padded
token from the native ``BatchBuilder``) makes the program return without touching memory.
Reference: :func:`helixflow.kernels.reference.kv_cache.write_kv_cache`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._utils import (
    FLOAT_DTYPES,
    check_launchable,
    check_same_dtype,
    check_tensor,
    next_power_of_2,
)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_DIM)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    # NOTE: the cache is contiguous, so a slot's row of all heads starts at slot * heads * dim.
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    k_src = token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    v_src = token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    k = tl.load(key_ptr + k_src, mask=mask)
    v = tl.load(value_ptr + v_src, mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping``.

    ``key`` and ``value`` may be strided views (e.g. slices of a fused qkv projection) with a
    contiguous last dimension; the caches must be contiguous. ``slot_mapping`` is ``[num_tokens]``
    int64 (or int32); negative slots are skipped. Slots are not range-checked on the device
    (that would need a host sync): they must be below ``num_blocks * block_size``.
    """
    key_cache = check_tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES)
    device = key_cache.device
    check_launchable(key_cache, "key_cache")
    value_cache = check_tensor("value_cache", value_cache, ndim=4, dtypes=FLOAT_DTYPES,
                               device=device)  # fmt: skip
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} != key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    _, _, num_kv_heads, head_dim = key_cache.shape
    for name, t in (("key", key), ("value", value)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=device, contiguous=False,
                     last_dim_contiguous=True)  # fmt: skip
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}] to match the cache, "
                f"got {tuple(t.shape)}"
            )
    check_same_dtype("key and value", key, value)
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    num_tokens = key.shape[0]
    slot_mapping = check_tensor("slot_mapping", slot_mapping, ndim=1,
                                dtypes=(torch.int32, torch.int64), device=device)  # fmt: skip
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens"
        )
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HEADS=next_power_of_2(num_kv_heads), BLOCK_DIM=next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, enable_fp_fusion=True,
    )  # fmt: skip
