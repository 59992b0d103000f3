"""Step inputs for the model runner (reference of ``helixflow._native.BatchBuilder``).

``build(scheduler)`` writes the step that ``scheduler.schedule()`` just decided into
preallocated arrays, which are exposed as numpy arrays that alias the buffers
(``torch.from_numpy`` shares them too): allocate once, wrap once, read every step. Their
contents are overwritten by the next ``build``. Only the first ``num_tokens`` entries of the
token arrays, the first ``num_seqs`` rows of the per-sequence arrays (``num_seqs + 1`` for
``query_start_loc``) and, per row, the first ``cdiv(seq_lens[i], block_size)`` block-table
entries are meaningful; padded token slots (``pad_to``) have input id 0, position 0 and slot -1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from helixflow.pool.reference.block_allocator import cdiv
from helixflow.pool.reference.scheduler import Scheduler


class BatchBuilder:
    """Preallocated flat-batch buffers: ids, positions, slots, block tables, lengths.

    Not thread-safe: build on the engine thread that owns the scheduler.
    """

    def __init__(
        self, max_num_seqs: int, max_num_batched_tokens: int, max_blocks_per_seq: int,
        block_size: int,
    ) -> None:  # fmt: skip
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_blocks_per_seq", max_blocks_per_seq),
            ("block_size", block_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._max_blocks_per_seq = max_blocks_per_seq
        self._block_size = block_size
        self.input_ids: npt.NDArray[np.int32] = np.zeros(max_num_batched_tokens, np.int32)
        self.positions: npt.NDArray[np.int64] = np.zeros(max_num_batched_tokens, np.int64)
        self.slot_mapping: npt.NDArray[np.int64] = np.full(max_num_batched_tokens, -1, np.int64)
        self.block_tables: npt.NDArray[np.int32] = np.zeros(
            (max_num_seqs, max_blocks_per_seq), np.int32
        )
        self.seq_lens: npt.NDArray[np.int32] = np.zeros(max_num_seqs, np.int32)
        self.query_start_loc: npt.NDArray[np.int32] = np.zeros(max_num_seqs + 1, np.int32)
        self.num_tokens = 0
        self.num_seqs = 0

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler) -> BatchBuilder:
        """Buffers sized for everything ``scheduler`` can schedule."""
        return cls(
            scheduler.max_num_seqs, scheduler.max_num_batched_tokens,
            cdiv(scheduler.max_model_len, scheduler.block_size), scheduler.block_size,
        )  # fmt: skip

    def build(self, scheduler: Scheduler, pad_to: int = 0) -> int:
        """Write the scheduler's open step; returns the number of tokens (before padding)."""
        rows = scheduler._step_rows()
        if scheduler.block_size != self._block_size:
            raise ValueError(
                f"block_size mismatch: scheduler {scheduler.block_size}, builder {self._block_size}"
            )
        num_tokens = sum(r.num_scheduled for r in rows)
        if len(rows) > self._max_num_seqs:
            raise ValueError(f"{len(rows)} sequences exceed max_num_seqs={self._max_num_seqs}")
        if max(num_tokens, pad_to) > self._max_num_batched_tokens:
            raise ValueError(
                f"{max(num_tokens, pad_to)} tokens exceed "
                f"max_num_batched_tokens={self._max_num_batched_tokens}"
            )
        bs = self._block_size
        alloc = scheduler.allocator
        t = 0
        self.query_start_loc[0] = 0
        for i, req in enumerate(rows):
            if req.finished:
                raise ValueError(
                    f"request {req.request_id} was aborted after schedule(): build() comes first"
                )
            start, n = req.num_computed_tokens, req.num_scheduled
            seq_len = start + n
            table = alloc.block_table(req.request_id)
            num_blocks = cdiv(seq_len, bs)
            if num_blocks > self._max_blocks_per_seq:
                raise ValueError(
                    f"request {req.request_id} needs {num_blocks} blocks > "
                    f"max_blocks_per_seq={self._max_blocks_per_seq}"
                )
            pos = np.arange(start, seq_len, dtype=np.int64)
            blocks = np.asarray(table[:num_blocks], dtype=np.int64)
            self.input_ids[t : t + n] = req.token_ids[start:seq_len]
            self.positions[t : t + n] = pos
            self.slot_mapping[t : t + n] = blocks[pos // bs] * bs + pos % bs
            self.block_tables[i, :num_blocks] = table[:num_blocks]
            self.seq_lens[i] = seq_len
            t += n
            self.query_start_loc[i + 1] = t
        if pad_to > t:
            self.input_ids[t:pad_to] = 0
            self.positions[t:pad_to] = 0
            self.slot_mapping[t:pad_to] = -1
        self.num_tokens = t
        self.num_seqs = len(rows)
        return t
