"""Shared helpers of the kernel tests: tolerances per dtype and a dtype-aware comparison."""

from __future__ import annotations

import torch

# (dtype, atol, rtol) per dtype: fp32 accumulates in fp32 like the reference; the half types
# round their inputs and outputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare in fp32 with the tolerances of ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)
