"""SiLU-gated linear unit, ``silu(gate) * up``: the torch reference of ``kernels/activation.py``.

The MLP of Llama-family models projects to ``[..., 2 * d]`` (gate and up concatenated) and feeds
the product of the two halves to the down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helixflow.kernels._utils import FLOAT_DTYPES, check_same_dtype, check_shape, check_tensor


def check_silu_and_mul_args(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Checks shared by both paths (no layout checks): x [..., 2 * d] of a float dtype with d > 0;
    out, when given, [..., d] of x's dtype and device. Returns (x, d)."""
    x = check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.dim() == 0 or x.size(-1) == 0 or x.size(-1) % 2:
        raise ValueError(f"x must have shape [..., 2 * d] with d > 0, got {tuple(x.shape)}")
    d = x.size(-1) // 2
    if out is not None:
        out = check_tensor("out", out, device=x.device, contiguous=False)
        check_shape("out", out, (*x.shape[:-1], d))
        check_same_dtype("x and out", x, out)
    return x, d


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` in fp32, rounded once to ``x.dtype``.

    x: [..., 2 * d]; out: optional [..., d] output of ``x``'s dtype (must not overlap ``x``).
    Returns ``out`` when given, else a new tensor.
    """
    x, d = check_silu_and_mul_args(x, out)
    xf = x.float()
    y = F.silu(xf[..., :d]).mul_(xf[..., d:]).to(x.dtype)  # silu() gives a new tensor
    if out is None:
        return y
    return out.copy_(y)
