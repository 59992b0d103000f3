"""BatchBuilder: exact flat-batch contents, padding, and zero-copy views of its buffers."""

from __future__ import annotations

import numpy as np
import pytest

ARRAYS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def _mixed_step(core, step):
    """Open a step with request 1 decoding (position 5) and request 2 prefilling 7 of 10.

    Request 1 holds blocks [0, 1]; request 2 gets blocks [2, 3] (block size 4).
    """
    sched = core.Scheduler(16, 4, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=32)
    sched.add_request(1, [10, 11, 12, 13, 14], max_tokens=5)
    step(sched, 50)
    sched.add_request(2, list(range(20, 30)), max_tokens=5)
    sched.schedule()
    return sched


def test_for_scheduler_sizes_the_buffers(core) -> None:
    sched = core.Scheduler(16, 4, max_num_batched_tokens=8, max_num_seqs=3, max_model_len=30)
    builder = core.BatchBuilder.for_scheduler(sched)
    shapes = [getattr(builder, name).shape for name in ARRAYS]
    assert shapes == [(8,), (8,), (8,), (3, 8), (3,), (4,)]
    dtypes = [str(getattr(builder, name).dtype) for name in ARRAYS]
    assert dtypes == ["int32", "int64", "int64", "int32", "int32", "int32"]
    assert (builder.num_tokens, builder.num_seqs) == (0, 0)


def test_new_builder_buffers_are_zero_and_slots_minus_one(core) -> None:
    builder = core.BatchBuilder(2, 3, 2, 4)
    assert builder.input_ids.tolist() == [0, 0, 0]
    assert builder.positions.tolist() == [0, 0, 0]
    assert builder.slot_mapping.tolist() == [-1, -1, -1]
    assert builder.block_tables.tolist() == [[0, 0], [0, 0]]
    assert builder.seq_lens.tolist() == [0, 0]
    assert builder.query_start_loc.tolist() == [0, 0, 0]


def test_build_mixed_decode_and_prefill_step(core, step) -> None:
    sched = _mixed_step(core, step)
    builder = core.BatchBuilder.for_scheduler(sched)
    assert builder.build(sched) == 8
    assert (builder.num_tokens, builder.num_seqs) == (8, 2)
    assert builder.input_ids.tolist() == [50, 20, 21, 22, 23, 24, 25, 26]
    assert builder.positions.tolist() == [5, 0, 1, 2, 3, 4, 5, 6]
    assert builder.slot_mapping.tolist() == [5, 8, 9, 10, 11, 12, 13, 14]  # block*4 + offset
    assert builder.block_tables[:2, :2].tolist() == [[0, 1], [2, 3]]
    assert builder.seq_lens[:2].tolist() == [6, 7]
    assert builder.query_start_loc[:3].tolist() == [0, 1, 8]


def test_build_next_step_continues_positions(core, step) -> None:
    sched = _mixed_step(core, step)
    builder = core.BatchBuilder.for_scheduler(sched)
    builder.build(sched)
    sched.update([51, 60])
    sched.schedule()
    assert builder.build(sched) == 4
    assert builder.input_ids[:4].tolist() == [51, 27, 28, 29]
    assert builder.positions[:4].tolist() == [6, 7, 8, 9]
    assert builder.slot_mapping[:4].tolist() == [6, 15, 16, 17]  # 4 is a new block
    assert builder.block_tables[:2, :3].tolist() == [[0, 1, 0], [2, 3, 4]]
    assert builder.seq_lens[:2].tolist() == [7, 10]
    assert builder.query_start_loc[:3].tolist() == [0, 1, 4]


def test_build_uses_the_blocks_of_a_prefix_cache_hit(core, step) -> None:
    sched = core.Scheduler(16, 4, max_model_len=32)
    sched.add_request(1, list(range(20, 30)), max_tokens=5)
    step(sched, 50)
    sched.add_request(2, list(range(20, 30)), max_tokens=5)
    sched.schedule()
    builder = core.BatchBuilder.for_scheduler(sched)
    assert builder.build(sched) == 3
    assert builder.input_ids[:3].tolist() == [50, 28, 29]
    assert builder.positions[:3].tolist() == [10, 8, 9]
    assert builder.slot_mapping[:3].tolist() == [10, 12, 13]
    assert builder.block_tables[:2, :3].tolist() == [[0, 1, 2], [0, 1, 3]]
    assert builder.seq_lens[:2].tolist() == [11, 10]
    assert builder.query_start_loc[:3].tolist() == [0, 1, 3]


def test_build_rows_exclude_forked_children(core, step) -> None:
    """A child forked after schedule() is in update() but not in the batch being built."""
    sched = core.Scheduler(16, 4, max_model_len=32)
    sched.add_request(1, [10, 11, 12, 13, 14, 15], max_tokens=5)
    step(sched, 50)
    sched.schedule()
    sched.fork(1, 2)
    builder = core.BatchBuilder.for_scheduler(sched)
    assert builder.build(sched) == 1
    assert builder.num_seqs == 1
    assert (builder.input_ids[0], builder.positions[0], builder.slot_mapping[0]) == (50, 6, 6)


def test_pad_to_fills_ids_positions_zero_and_slots_minus_one(core, step) -> None:
    sched = _mixed_step(core, step)
    builder = core.BatchBuilder.for_scheduler(sched)
    builder.build(sched)
    sched.update([51, 60])
    sched.abort(2)
    sched.schedule()
    assert builder.build(sched, pad_to=6) == 1
    assert builder.num_tokens == 1
    assert builder.input_ids[:6].tolist() == [51, 0, 0, 0, 0, 0]
    assert builder.positions[:6].tolist() == [6, 0, 0, 0, 0, 0]
    assert builder.slot_mapping[:6].tolist() == [6, -1, -1, -1, -1, -1]
    assert builder.input_ids[6:].tolist() == [25, 26]  # past pad_to: stale, untouched


def test_arrays_are_views_of_persistent_buffers(core, step) -> None:
    """An array fetched before build() shows what the build writes: no copies."""
    sched = _mixed_step(core, step)
    builder = core.BatchBuilder.for_scheduler(sched)
    before = {name: getattr(builder, name) for name in ARRAYS}
    builder.build(sched)
    assert before["input_ids"][:2].tolist() == [50, 20]
    assert before["positions"][:2].tolist() == [5, 0]
    assert before["slot_mapping"][:2].tolist() == [5, 8]
    assert before["block_tables"][1, :2].tolist() == [2, 3]
    assert before["seq_lens"][:2].tolist() == [6, 7]
    assert before["query_start_loc"][:3].tolist() == [0, 1, 8]
    for name in ARRAYS:
        assert np.shares_memory(getattr(builder, name), getattr(builder, name)), name
        assert np.shares_memory(before[name], getattr(builder, name)), name


@pytest.mark.parametrize("name", ARRAYS)
def test_arrays_outlive_a_dropped_builder_reference(core, name: str) -> None:
    """A view keeps its buffer alive after the last other reference to the builder goes."""
    array = getattr(core.BatchBuilder(2, 3, 2, 4), name)
    assert array.sum() == (-3 if name == "slot_mapping" else 0)
