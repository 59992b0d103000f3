"""Shared checks of ``load_weights``: a weight's shape, and nothing missing or unexpected."""

from __future__ import annotations

from collections.abc import Iterable

import torch

_MAX_LISTED = 20


def listed(names: Iterable[str]) -> str:
    """Sorted names, at most 20 of them, then how many more."""
    ordered = sorted(names)
    more = len(ordered) - _MAX_LISTED
    return ", ".join(ordered[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def copy_weight(dest: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into its slot (dtype and device converted); ValueError naming
    the weight when the shapes differ."""
    if tuple(tensor.shape) != tuple(dest.shape):
        raise ValueError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(tensor)


def check_complete(
    model: str, expected: Iterable[str], loaded: set[str], unexpected: list[str]
) -> None:
    """ValueError naming every missing and every unexpected weight, if there is any."""
    missing = set(expected) - loaded
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {listed(unexpected)}")
        raise ValueError(f"{model} weights do not match the config: " + "; ".join(problems))
