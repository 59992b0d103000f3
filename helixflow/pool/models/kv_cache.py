"""The paged KV cache: one pair of preallocated tensors per decoder layer.

Each layer's cache is ``(key_cache, value_cache)``, both ``[num_blocks, block_size, num_kv_heads,
head_dim]``: the layout ``helixflow.kernels`` reads and writes. The engine sizes ``num_blocks``
from free memory with :func:`kv_cache_bytes_per_block` (or :func:`num_blocks_for_bytes`) and
allocates once, before the first step (gpt-fast's static preallocation).
"""

from __future__ import annotations

import torch

from helixflow.pool.models.config import ModelConfig

__all__ = ["allocate_kv_cache", "kv_cache_bytes_per_block", "num_blocks_for_bytes"]


def _check_decoder(config: ModelConfig) -> None:
    if config.architecture != "llama":
        raise ValueError(
            f"a KV cache is for decoder models; architecture {config.architecture!r} has none"
        )


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, keys and values:
    ``2 * num_hidden_layers * block_size * num_kv_heads * head_dim * itemsize``."""
    _check_decoder(config)
    _check_positive("block_size", block_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = block_size * config.num_key_value_heads * config.head_dim * itemsize
    return 2 * config.num_hidden_layers * per_layer


def num_blocks_for_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_bytes: int
) -> int:
    """How many whole blocks fit in ``num_bytes`` (0 when not even one does)."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    return num_bytes // kv_cache_bytes_per_block(config, block_size, dtype)


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed ``(key_cache, value_cache)`` per layer, each
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` of ``dtype`` on ``device``.

    NOTE: zeros, not ``torch.empty``: attention masks the rows past a sequence's length, but
    a masked row still meets a zero probability in ``probs @ v`` on the torch path, and
    ``0 * NaN`` from uninitialised memory would be NaN. Zeroing costs one pass at start-up.
    """
    _check_decoder(config)
    _check_positive("num_blocks", num_blocks)
    _check_positive("block_size", block_size)
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(config.num_hidden_layers)
    ]
