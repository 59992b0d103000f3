"""Helpers for the model parity tests: HF configs -> ``ModelConfig``, random weights that make
every layer matter, and a hand-built paged cache driven like the engine drives it.

``PagedRunner`` lays a step out exactly as ``helixflow.pool.reference.batch_builder`` does
(flat tokens, ``query_start_loc``, one slot per token, block tables whose unused tail holds
stale block ids), with blocks taken from a shuffled free list, so neighbouring positions of a
sequence sit in unrelated blocks.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from helixflow.pool.models.config import AttentionMetadata, ModelConfig
from helixflow.pool.models.kv_cache import allocate_kv_cache
from helixflow.pool.models.llama import LlamaForCausalLM

ON_GPU = torch.cuda.is_available()
# NOTE: as in tests/kernels/conftest.py: without a GPU the Triton kernels can only run in the
# interpreter, which triton.jit chooses at decoration time, so the switch must precede the
# first `import triton` (building a transformers model imports it). INTERPRETER_READY says
# whether that worked (nothing imported triton before this module).
if not ON_GPU:
    INTERPRETER_READY = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    INTERPRETER_READY = False

BLOCK_SIZE = 16


def llama_config_from_hf(hf: Any) -> ModelConfig:
    """The ``ModelConfig`` of a transformers Llama/Mistral/Qwen2 config (transformers 5 names)."""
    rope = dict(hf.rope_parameters)
    theta = float(rope.pop("rope_theta"))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return ModelConfig(
        architecture="llama",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=hf.tie_word_embeddings,
        attention_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        sliding_window=getattr(hf, "sliding_window", None),
    )


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """O(1)-scale random weights: matrices ~ N(0, 1/fan_in), vectors 1 + N(0, 0.1) for norm
    weights and N(0, 0.1) for biases. HF's own init (std 0.02) leaves logits near zero, where a
    broken attention would hardly show."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2:
            p.copy_(noise / math.sqrt(p.shape[-1]))
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1.0 + 0.1 * noise)


def prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """Random prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (n,), generator=gen).tolist() for n in lengths]


@dataclass
class Sequence:
    """One request: its tokens so far, how many are in the cache, and its blocks."""

    token_ids: list[int]
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)


class PagedRunner:
    """Runs a ``LlamaForCausalLM`` step by step over a paged cache built by hand, on the
    model's device; the step's index tensors are made on the host and copied there."""

    def __init__(
        self, model: LlamaForCausalLM, *, num_blocks: int = 64, max_blocks_per_seq: int = 8,
        seed: int = 0,
    ) -> None:  # fmt: skip
        self.model = model
        self.device = model.embed_tokens.device
        self.gen = torch.Generator().manual_seed(seed)
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = max_blocks_per_seq
        self.free = torch.randperm(num_blocks, generator=self.gen).tolist()
        self.kv_caches = allocate_kv_cache(
            model.config, num_blocks, BLOCK_SIZE, model.embed_tokens.dtype, self.device
        )

    def step(self, scheduled: list[tuple[Sequence, int]], pad_to: int = 0) -> torch.Tensor:
        """Run ``n`` new tokens of each scheduled sequence; fp32 logits of every token [T, V].

        ``pad_to`` appends padded tokens (id 0, position 0, slot -1) as the batch builder does.
        """
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        # NOTE: the tail of each table holds random ("stale") block ids: never to be read.
        tables = torch.randint(
            self.num_blocks, (len(scheduled), self.max_blocks_per_seq), generator=self.gen
        ).to(torch.int32)
        seq_lens = []
        for row, (seq, n) in enumerate(scheduled):
            start, end = seq.num_computed, seq.num_computed + n
            while len(seq.blocks) * BLOCK_SIZE < end:
                seq.blocks.append(self.free.pop())
            tables[row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
            for pos in range(start, end):
                ids.append(seq.token_ids[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            starts.append(starts[-1] + n)
            seq_lens.append(end)
        num_tokens = len(ids)
        pad = max(pad_to - num_tokens, 0)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots + [-1] * pad, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in scheduled),
            max_seq_len=max(seq_lens),
            decode_only=all(n == 1 for _, n in scheduled),
        )
        hidden = self.model(
            torch.tensor(ids + [0] * pad, dtype=torch.int32, device=dev),
            torch.tensor(positions + [0] * pad, dtype=torch.int64, device=dev),
            self.kv_caches,
            meta,
        )
        for seq, n in scheduled:
            seq.num_computed += n
        return self.model.compute_logits(hidden[:num_tokens]).cpu()
