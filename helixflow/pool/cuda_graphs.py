"""CUDA graphs of the decode step: one captured forward pass per batch-size bucket, replayed.

A decode step at small batch sizes is bound by kernel launches (~10 per layer), not by the GPU;
replaying a captured graph launches them all at once. A step with ``n`` decode sequences runs
the graph of the smallest bucket ``b >= n``: rows ``n .. b-1`` are padding (slot -1, so
nothing is written to the KV cache; sequence length 0, so attention gives zeros) and their
hidden states are dropped.

Every graph reads its inputs from static tensors that each step overwrites in place. Graphs
are captured with ``max_seq_len = max_model_len`` (the decode kernel's split count is a launch
parameter; the per-sequence split lengths are computed on the device), from the largest bucket
down, sharing one memory pool.

NOTE: the first replay of each bucket is checked against an eager forward pass over the same
inputs; a mismatch (or a failed capture) disables the graphs with an error in the log and the
engine runs eagerly, so a graph can cost speed but never correctness.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import numpy as np
import torch

from helixflow.pool.llm_engine import CausalLM
from helixflow.pool.models.config import AttentionMetadata

log = logging.getLogger("helixflow.pool.cuda_graphs")

__all__ = ["DecodeGraphs", "batch_buckets"]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_num_seqs`` (and it, if not one)."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    """Captured decode steps of ``model`` for the batch sizes of :func:`batch_buckets`."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        sizes: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes) if sizes else batch_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.enabled = True
        dev = kv_caches[0][0].device
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.checked: set[int] = set()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            decode_only=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:size], self.positions[:size], self.kv_caches, self._meta(size)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, one shared pool); on failure disable graphs."""
        pool = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.sizes):
                self._forward(size)  # compiles the Triton kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            self._disable(f"capturing the decode graphs failed ({exc})")
            return
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _disable(self, why: str) -> None:
        log.error("%s; decode steps run without CUDA graphs", why)
        self.enabled = False
        self.graphs.clear()
        self.outputs.clear()

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured size holding ``num_seqs`` rows, None if there is none."""
        if not self.enabled:
            return None
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def run(
        self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
        block_tables: np.ndarray, seq_lens: np.ndarray,
    ) -> torch.Tensor | None:  # fmt: skip
        """Replay the decode step for these host arrays (one row per sequence); returns the
        hidden states ``[n, hidden]``, or None when no graph fits (the caller runs eagerly)."""
        n = len(seq_lens)
        size = self.bucket(n)
        if size is None:
            return None
        width = block_tables.shape[1]
        self.input_ids[:n].copy_(torch.from_numpy(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.from_numpy(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.from_numpy(slot_mapping), non_blocking=True)
        self.block_tables[:n, :width].copy_(torch.from_numpy(block_tables), non_blocking=True)
        self.seq_lens[:n].copy_(torch.from_numpy(seq_lens), non_blocking=True)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[n:size].zero_()
        if size not in self.checked:
            return self._first_replay(size, n)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _first_replay(self, size: int, n: int) -> torch.Tensor:
        """Replay, then the same step eagerly: equal results keep the graph on.

        NOTE: both passes write the same keys and values to the same slots, so the cache ends
        as after one step.
        """
        self.graphs[size].replay()
        replayed = self.outputs[size][:n].clone()
        eager = self._forward(size)[:n]
        self.checked.add(size)
        # NOTE: a tolerance, not equality: cuBLAS may pick another algorithm under capture. A
        # graph replaying stale or misplaced inputs is off by far more.
        diff = (replayed.float() - eager.float()).abs().max().item()
        if not diff <= 1e-2 * max(eager.float().abs().max().item(), 1.0):
            self._disable(f"the batch-{size} decode graph differs from eager (max |diff| {diff})")
        return eager
