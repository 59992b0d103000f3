"""Argument checks and launch helpers shared by every kernel's host function.

Every public host function validates its tensors before a launch: a Triton kernel given a wrong
shape, dtype or stride reads or writes out of bounds instead of failing, so each check raises a
``ValueError`` that names the argument and says what was expected.

NOTE: every launch passes ``enable_fp_fusion`` explicitly: Triton 3.9 warns on each compile that
leaves it to the environment (its default changes in 3.10), and the kernels' numerics should not
depend on the Triton version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument; return it typed as a tensor.

    ``contiguous`` demands a fully contiguous tensor; ``last_dim_contiguous`` (with
    ``contiguous=False``) only demands unit stride in the last dimension, which is what a kernel
    that takes row strides needs.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        allowed = tuple(dtypes)
        if t.dtype not in allowed:
            raise ValueError(
                f"{name} must have dtype {_dtype_names(allowed)}, got {str(t.dtype)[6:]}"
            )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the rest)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()})")
    if last_dim_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension")
    return t


def as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., n] as a [rows, n] view (never a copy: in-place ops write through it).

    The last dimension must have unit stride and the leading ones must flatten to one row stride
    (true for contiguous tensors and for row slices such as ``x[:, :hidden]`` of a wider buffer).
    """
    check_tensor(name, t, contiguous=False, last_dim_contiguous=True)
    try:
        return t.view(-1, t.size(-1))
    except RuntimeError:
        raise ValueError(
            f"{name} must have leading dimensions that flatten to one row stride "
            f"(shape {tuple(t.shape)}, strides {t.stride()})"
        ) from None


def check_same_dtype(names: str, *tensors: torch.Tensor) -> None:
    """All ``tensors`` share one dtype; ``names`` reads like "q, k and v"."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        found = ", ".join(str(t.dtype)[6:] for t in tensors)
        raise ValueError(f"{names} must have the same dtype, got {found}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    """``t`` has exactly the shape ``expected``."""
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def check_positive(name: str, value: float) -> None:
    """A finite, strictly positive number (eps, scale, rope theta...)."""
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_launchable(t: torch.Tensor, name: str) -> None:
    """A Triton kernel can run on ``t``: a CUDA tensor, or any tensor under the interpreter."""
    if t.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need a CUDA tensor (or "
            "TRITON_INTERPRET=1 to interpret them on CPU); use the helixflow.kernels "
            "dispatch functions to fall back to the torch reference"
        )
