"""RMSNorm, plain and fused with the residual add, as Triton kernels.

Same functions and semantics as ``helixflow.kernels.reference.norm``: fp32 math, one rounding to
the input's dtype at the end. One program normalises one row. A row of up to
``MAX_BLOCK_SIZE`` elements is held in registers (one read of the input); a longer row is walked
twice in ``MAX_BLOCK_SIZE`` chunks, once for the sum of squares and once to write the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helixflow.kernels._utils import (
    as_rows,
    check_launchable,
    check_same_dtype,
    check_shape,
    check_tensor,
    next_power_of_2,
)
from helixflow.kernels.reference.norm import check_norm_args

# NOTE: 4096 fp32 values per tensor are 16 registers per thread at 8 warps; Llama-8B (4096) and
# every smaller model normalise in one pass, wider rows (Llama-70B: 8192) loop over chunks.
MAX_BLOCK_SIZE = 4096


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    n_cols,
    eps,
    BLOCK_SIZE: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    """out[row] = x[row] * rsqrt(mean(x[row]**2) + eps) * weight; one program per row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    if SINGLE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_SIZE):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x * rstd * w).to(out_ptr.dtype.element_ty)
            tl.store(out_row + start + cols, y, mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    x_row_stride,
    residual_row_stride,
    n_cols,
    eps,
    BLOCK_SIZE: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    """residual[row] += x[row]; x[row] = rms_norm(residual[row]); one program per row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = residual_ptr + row * residual_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    if SINGLE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        res = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        # The norm reads the residual as stored: rounded to its dtype, then widened again.
        new_res = (x + res).to(residual_ptr.dtype.element_ty)
        tl.store(res_row + cols, new_res, mask=mask)
        r = new_res.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(r * r, axis=0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_row + cols, (r * rstd * w).to(x_ptr.dtype.element_ty), mask=mask)
    else:
        # NOTE: the first pass only reads; the second recomputes the (deterministic) rounded sum
        # from the untouched inputs and writes both outputs. Storing the residual in pass one and
        # re-reading it in pass two would rely on a store being visible to the load of another
        # thread of the program, which needs a barrier; recomputing costs one extra read of x.
        sum_sq = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            res = tl.load(res_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            r = (x + res).to(residual_ptr.dtype.element_ty).to(tl.float32)
            sum_sq += r * r
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_SIZE):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            res = tl.load(res_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            new_res = (x + res).to(residual_ptr.dtype.element_ty)
            tl.store(res_row + start + cols, new_res, mask=mask)
            w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (new_res.to(tl.float32) * rstd * w).to(x_ptr.dtype.element_ty)
            tl.store(x_row + start + cols, y, mask=mask)


def _check_norm_args(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's checks, plus a launchable device and a contiguous weight."""
    x, weight = check_norm_args(x, weight, eps)
    check_launchable(x, "x")
    check_tensor("weight", weight)
    return x, weight


def _launch_config(hidden: int) -> tuple[int, bool, int]:
    """(BLOCK_SIZE, SINGLE_PASS, num_warps) for rows of ``hidden`` elements."""
    block = min(next_power_of_2(hidden), MAX_BLOCK_SIZE)
    # NOTE: about 8 elements per thread per tensor: 1 warp up to 256, 8 warps from 2048.
    num_warps = min(max(block // 256, 1), 8)
    return block, hidden <= block, num_warps


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in fp32, rounded once to ``x.dtype``.

    x: [..., hidden] with a unit-stride last dimension (rows may be strided); weight: [hidden],
    contiguous, same dtype; out: optional [..., hidden] output of ``x``'s dtype and device (it may
    be ``x`` itself, a partial overlap is undefined). Returns ``out`` when given, else a new
    contiguous tensor.
    """
    x, weight = _check_norm_args(x, weight, eps)
    x_rows = as_rows("x", x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, device=x.device, contiguous=False)
        check_shape("out", out, tuple(x.shape))
        check_same_dtype("x and out", x, out)
    out_rows = as_rows("out", out)
    num_rows, hidden = x_rows.shape
    if num_rows == 0:
        return out
    block, single_pass, num_warps = _launch_config(hidden)
    _rms_norm_kernel[(num_rows,)](
        x_rows,
        weight,
        out_rows,
        x_rows.stride(0),
        out_rows.stride(0),
        hidden,
        float(eps),
        BLOCK_SIZE=block,
        SINGLE_PASS=single_pass,
        num_warps=num_warps,
        enable_fp_fusion=True,
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """In place, one launch: ``residual += x``, then ``x = rms_norm(residual, weight, eps)``.

    Equals the unfused ``residual.add_(x); x.copy_(rms_norm(residual, weight, eps))``: the norm
    reads the new residual rounded to its dtype. x and residual: [..., hidden] of one shape and
    dtype, unit-stride last dimension, rows may be strided, must not overlap; weight: [hidden],
    contiguous, same dtype. Returns ``x``.
    """
    x, weight = _check_norm_args(x, weight, eps)
    residual = check_tensor("residual", residual, device=x.device, contiguous=False)
    check_shape("residual", residual, tuple(x.shape))
    check_same_dtype("x and residual", x, residual)
    x_rows = as_rows("x", x)
    res_rows = as_rows("residual", residual)
    num_rows, hidden = x_rows.shape
    if num_rows == 0:
        return x
    block, single_pass, num_warps = _launch_config(hidden)
    _fused_add_rms_norm_kernel[(num_rows,)](
        x_rows,
        res_rows,
        weight,
        x_rows.stride(0),
        res_rows.stride(0),
        hidden,
        float(eps),
        BLOCK_SIZE=block,
        SINGLE_PASS=single_pass,
        num_warps=num_warps,
        enable_fp_fusion=True,
    )
    return x
