"""The model vocabulary shared by loaders, model code and the engine.

``ModelConfig`` is what a loader (Hugging Face directory or GGUF file) produces and what the
torch model is built from; ``AttentionMetadata`` is what the engine hands the model each step,
straight from the native ``BatchBuilder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import torch


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Architecture hyper-parameters, named as in Hugging Face ``config.json``.

    ``architecture`` is ``"llama"`` (Llama 2/3, Mistral, SmolLM2, Qwen2: decoder-only with
    RMSNorm, RoPE, gated SiLU MLP) or ``"bert"`` (encoder for embeddings).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-12  # bert
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    sliding_window: int | None = None
    type_vocab_size: int = 2  # bert
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.architecture not in ("llama", "bert"):
            raise ValueError(f"model config: unsupported architecture {self.architecture!r}")


@dataclass
class AttentionMetadata:
    """One step's attention inputs (device tensors) plus host-side bounds.

    ``slot_mapping [num_tokens]`` int64 (-1 = padding), ``block_tables [num_seqs, max_blocks]``
    int32, ``seq_lens [num_seqs]`` int32 (tokens in the cache after this step),
    ``query_start_loc [num_seqs + 1]`` int32; ``max_query_len``/``max_seq_len`` are host ints
    (known to the batch builder) so the kernels never sync. ``decode_only`` when every sequence
    has exactly one query token (the decode kernel is used then).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    decode_only: bool
