"""Pieces shared by the paged attention kernels: the dot helper and the argument checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive,
    check_tensor,
)

LOG2E = 1.4426950408889634  # softmax runs in the exp2 domain: exp(x) = exp2(x * log2(e))


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot`` that keeps fp32 inputs exact (``IEEE``) instead of rounding them to TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def load_kv_tile(
    k_cache_ptr, v_cache_ptr, table_ptr, toks, tok_ok, dims, dim_ok, head_offset,
    stride_c_block, stride_c_tok,
    BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Keys and values ``[len(toks), len(dims)]`` of one KV head for the token positions
    ``toks`` of a sequence whose block table starts at ``table_ptr``; masked rows are zero.

    Each token's row is found through its block: ``table[tok // BLOCK_SIZE]``, row
    ``tok % BLOCK_SIZE``; only entries of valid tokens are read, so a stale block-table tail is
    never touched.
    """
    block = tl.load(table_ptr + toks // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
    offs = block * stride_c_block + (toks % BLOCK_SIZE).to(tl.int64) * stride_c_tok + head_offset
    mask = tok_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=mask, other=0.0)
    if UPCAST:  # NOTE: the interpreter's tl.dot mis-handles bfloat16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


def check_query(q: object) -> torch.Tensor:
    """``q`` [tokens, heads, head_dim], float, unit stride in the last dimension."""
    checked: torch.Tensor = check_tensor(
        "q", q, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False, last_dim_contiguous=True
    )
    return checked


def check_paged_cache(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_seqs: int,
) -> tuple[int, int]:
    """Validate the cache, block tables and lengths against ``q``; -> (num_kv_heads, block_size)."""
    dev = q.device
    key_cache = check_tensor("key_cache", key_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    value_cache = check_tensor("value_cache", value_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} != key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but key_cache has {head_dim}")
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256, got {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q's {num_heads} heads must be a multiple of key_cache's {num_kv_heads} KV heads"
        )
    block_tables = check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES,
                                device=dev, contiguous=False, last_dim_contiguous=True)  # fmt: skip
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    seq_lens = check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries for {num_seqs} sequences")
    return num_kv_heads, block_size


def check_options(scale: float, sliding_window: int | None) -> None:
    """The softmax scale and the optional sliding window."""
    check_positive("scale", scale)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")


def output_for(q: torch.Tensor, out: torch.Tensor | None, *, zeros: bool) -> torch.Tensor:
    """``out`` checked against ``q``, or a new tensor like ``q`` (zeroed when ``zeros``)."""
    if out is None:
        return torch.zeros_like(q) if zeros else torch.empty_like(q)
    check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device, contiguous=False,
                 last_dim_contiguous=True)  # fmt: skip
    if out.shape != q.shape:
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    return out
