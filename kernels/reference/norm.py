"""RMSNorm, plain and fused with the residual add: the torch reference of ``kernels/norm.py``.

Both compute in fp32 and round once, to the input's dtype, at the end. Hugging Face's
``LlamaRMSNorm`` rounds the normalised activations to the input dtype *before* multiplying by the
weight; for fp16/bf16 the two differ by at most one rounding of the output.
"""

from __future__ import annotations

import torch

from helixflow.kernels._utils import (
    FLOAT_DTYPES,
    check_positive,
    check_same_dtype,
    check_shape,
    check_tensor,
)


def check_norm_args(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks shared by both norm paths (no layout checks): x [..., hidden] and weight [hidden]
    of one float dtype and device, eps > 0."""
    x = check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() == 0 or x.size(-1) == 0:
        raise ValueError(f"x must have shape [..., hidden] with hidden > 0, got {tuple(x.shape)}")
    weight = check_tensor("weight", weight, ndim=1, device=x.device, contiguous=False)
    check_shape("weight", weight, (x.size(-1),))
    check_same_dtype("x and weight", x, weight)
    check_positive("eps", eps)
    return x, weight


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in fp32, rounded once to ``x.dtype``.

    x: [..., hidden]; weight: [hidden], same dtype; out: optional [..., hidden] output of
    ``x``'s dtype (it may be ``x`` itself). Returns ``out`` when given, else a new tensor.
    """
    x, weight = check_norm_args(x, weight, eps)
    if out is not None:
        out = check_tensor("out", out, device=x.device, contiguous=False)
        check_shape("out", out, tuple(x.shape))
        check_same_dtype("x and out", x, out)
    xf = x.float()
    # NOTE: the sum of squares as a vector norm (one fused pass) and the products into one new
    # tensor: same fp32 math as square().mean(), fewer passes (this is also the CPU path).
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    rstd = torch.rsqrt(norm.square_().div_(x.size(-1)).add_(eps))
    y = torch.mul(xf, rstd).mul_(weight.float()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """In place: ``residual += x``, then ``x = rms_norm(residual, weight, eps)``; returns ``x``.

    The norm reads the new residual *after* its rounding to the residual's dtype, so this equals
    the unfused ``residual.add_(x); x.copy_(rms_norm(residual, weight, eps))``. x and residual:
    [..., hidden] of one shape and dtype; weight: [hidden] of that dtype.
    """
    x, weight = check_norm_args(x, weight, eps)
    residual = check_tensor("residual", residual, device=x.device, contiguous=False)
    check_shape("residual", residual, tuple(x.shape))
    check_same_dtype("x and residual", x, residual)
    residual.add_(x)
    return rms_norm(residual, weight, eps, out=x)
