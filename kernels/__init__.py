"""``helixflow.kernels``: the model's hot path as Triton kernels, each beside a torch reference.

This directory is installed as ``helixflow.kernels`` (``wheel.packages`` in pyproject.toml).

Use the functions exported here: they run the Triton kernel on a CUDA tensor and the torch
reference anywhere else, so one model code path serves GPU and CPU. The implementations can be
called directly too: ``helixflow.kernels.<module>.<op>`` (Triton; needs CUDA, or the CPU
interpreter with ``TRITON_INTERPRET=1``) and ``helixflow.kernels.reference.<module>.<op>``
(torch only). Triton is imported on the first Triton call, so the CPU path works without it.

``HELIXFLOW_KERNELS`` overrides the choice: ``auto`` (default), ``triton`` (always Triton) or
``torch`` (always the reference).

=====================  ==========================================================
``rms_norm``           RMSNorm; ``fused_add_rms_norm`` adds the residual in place
``rotary_embedding``   RoPE in place on q and k (``rope_cos_sin_cache`` builds the table)
``silu_and_mul``       SiLU(gate) * up for gated MLPs
``write_kv_cache``     the step's keys/values into their paged-cache slots
``paged_decode_attention``   one query token per sequence, split-K, GQA, sliding window
``paged_prefill_attention``  chunks of new tokens over the paged cache (cached prefix)
``sample``             temperature / top-k / top-p / min-p sampling from per-row seeds
=====================  ==========================================================
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from helixflow.kernels.reference.rotary import rope_cos_sin_cache

__all__ = [
    "backend_for",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "sample",
    "silu_and_mul",
    "write_kv_cache",
]

_BACKENDS = ("auto", "triton", "torch")


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation the dispatch functions use for ``t``."""
    choice = os.environ.get("HELIXFLOW_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"HELIXFLOW_KERNELS must be one of {', '.join(_BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


@functools.cache
def _module(name: str) -> ModuleType:
    return importlib.import_module(f"helixflow.kernels.{name}")


def _dispatched(module: str, op: str, reference: str | None = None) -> Callable[..., Any]:
    """Run ``op`` from ``module`` (Triton) or from ``reference.<reference or module>`` (torch).

    The backend follows the first argument's device (see :func:`backend_for`).
    """
    ref_module = f"reference.{reference or module}"

    def call(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        impl = module if backend_for(first) == "triton" else ref_module
        return getattr(_module(impl), op)(first, *args, **kwargs)

    ref = _module(ref_module)
    call.__name__ = call.__qualname__ = op
    call.__doc__ = getattr(ref, op).__doc__
    call.__module__ = __name__
    return call


rms_norm = _dispatched("norm", "rms_norm")
fused_add_rms_norm = _dispatched("norm", "fused_add_rms_norm")
rotary_embedding = _dispatched("rotary", "rotary_embedding")
silu_and_mul = _dispatched("activation", "silu_and_mul")
write_kv_cache = _dispatched("kv_cache", "write_kv_cache")
paged_decode_attention = _dispatched("decode_attention", "paged_decode_attention", "attention")
paged_prefill_attention = _dispatched("prefill_attention", "paged_prefill_attention", "attention")
sample = _dispatched("sampling", "sample")
