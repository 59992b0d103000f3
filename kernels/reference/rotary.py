"""Rotary position embedding (RoPE): the cos/sin cache and the torch reference of
``kernels/rotary.py``.

The cache is shared by both paths: ``rope_cos_sin_cache`` builds it once per model, fp32
``[max_position, head_dim]`` holding ``cos(p * inv_freq)`` in the first half of each row and
``sin(p * inv_freq)`` in the second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from helixflow.kernels._utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive,
    check_same_dtype,
    check_shape,
    check_tensor,
)

ROPE_TYPES = ("default", "linear", "llama3")


def _scaling_number(scaling: Mapping[str, Any], key: str) -> float:
    """``scaling[key]`` as a finite number > 0, or a ValueError naming the key."""
    if key not in scaling:
        raise ValueError(
            f"rope_scaling[{key!r}] is missing (rope_type {rope_scaling_type(scaling)!r})"
        )
    value = scaling[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"rope_scaling[{key!r}] must be a number, got {value!r}")
    check_positive(f"rope_scaling[{key!r}]", float(value))
    return float(value)


def rope_scaling_type(scaling: Mapping[str, Any] | None) -> str:
    """The rope type of a Hugging Face ``rope_scaling`` dict ("default" for None)."""
    if scaling is None:
        return "default"
    # NOTE: "type" is the key of configs written before transformers 4.43 renamed it.
    key = "rope_type" if "rope_type" in scaling else "type"
    if key not in scaling:
        raise ValueError("rope_scaling['rope_type'] is missing")
    rope_type = scaling[key]
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling[{key!r}] must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}"
        )
    return str(rope_type)


def rope_inv_freq(
    head_dim: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """float64 [head_dim // 2] rotation frequencies ``theta ** (-2i / head_dim)``, then scaled.

    ``scaling`` is a Hugging Face ``rope_scaling`` dict: "linear" divides every frequency by
    "factor"; "llama3" (Llama 3.1) divides those whose wavelength exceeds
    ``original_max_position_embeddings / low_freq_factor`` by "factor", keeps those shorter than
    ``original_max_position_embeddings / high_freq_factor`` and blends in between.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    check_positive("theta", theta)
    rope_type = rope_scaling_type(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    if scaling is None or rope_type == "default":
        return inv_freq
    factor = _scaling_number(scaling, "factor")
    if rope_type == "linear":
        return inv_freq / factor
    low_freq_factor = _scaling_number(scaling, "low_freq_factor")
    high_freq_factor = _scaling_number(scaling, "high_freq_factor")
    original_max = _scaling_number(scaling, "original_max_position_embeddings")
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"rope_scaling['high_freq_factor'] ({high_freq_factor}) must exceed "
            f"rope_scaling['low_freq_factor'] ({low_freq_factor})"
        )
    wavelen = 2 * math.pi / inv_freq
    # smooth: 0 at the low-frequency wavelength (fully scaled), 1 at the high one (unscaled).
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original_max / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original_max / high_freq_factor, inv_freq, scaled)


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    theta: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """fp32 [max_position, head_dim]: ``cat(cos(p * inv_freq), sin(p * inv_freq))`` per position.

    ``inv_freq`` comes from ``rope_inv_freq(head_dim, theta, scaling)``; an unknown rope type or a
    missing scaling key raises a ValueError naming the key.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be an int >= 1, got {max_position!r}")
    # NOTE: angles are computed in float64 on the CPU and rounded once to fp32: an fp32 product
    # p * inv_freq is off by up to ~0.004 rad at p = 128k; the cache is built once per model.
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(torch.float32)
    return cache.to(device) if device is not None else cache


def check_rotary_args(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and devices shared by both ``rotary_embedding`` paths (no layout checks).

    positions [num_tokens] int32/int64; q [num_tokens, num_heads, head_dim] and
    k [num_tokens, num_kv_heads, head_dim] of one float dtype; cos_sin_cache fp32
    [max_position, head_dim]; all on q's device.
    """
    q = check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    num_tokens, _, head_dim = q.shape
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"q must have an even head_dim > 0, got shape {tuple(q.shape)}")
    k = check_tensor("k", k, ndim=3, device=q.device, contiguous=False)
    check_same_dtype("q and k", q, k)
    if k.size(0) != num_tokens or k.size(2) != head_dim:
        raise ValueError(
            f"k must have shape [{num_tokens}, num_kv_heads, {head_dim}] like q, "
            f"got {tuple(k.shape)}"
        )
    positions = check_tensor(
        "positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=q.device, contiguous=False
    )
    check_shape("positions", positions, (num_tokens,))
    cos_sin_cache = check_tensor(
        "cos_sin_cache",
        cos_sin_cache,
        ndim=2,
        dtypes=(torch.float32,),
        device=q.device,
        contiguous=False,
    )
    if cos_sin_cache.size(1) != head_dim:
        raise ValueError(
            f"cos_sin_cache must have shape [max_position, {head_dim}] (q's head_dim), "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    return positions, q, k, cos_sin_cache


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate fp32 x [tokens, heads, head_dim] by cos/sin [tokens, 1, head_dim // 2]."""
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> None:
    """Rotate q and k in place by the angles of each token's position (fp32 math, one rounding).

    positions: [num_tokens] int32/int64, each in ``[0, max_position)``; q: [num_tokens,
    num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim] (either may be a strided view);
    cos_sin_cache: from ``rope_cos_sin_cache``. ``is_neox`` pairs element i with i + head_dim / 2
    (Llama / GPT-NeoX "rotate half"); otherwise pairs 2i with 2i + 1 (GPT-J).
    """
    positions, q, k, cos_sin_cache = check_rotary_args(positions, q, k, cos_sin_cache)
    cos, sin = cos_sin_cache.index_select(0, positions.long()).unsqueeze(1).chunk(2, dim=-1)
    for t in (q, k):
        t.copy_(_rotate(t.float(), cos, sin, is_neox))
