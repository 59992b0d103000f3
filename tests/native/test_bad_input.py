"""Misuse raises the documented exception, never crashes, and leaves the object usable."""

from __future__ import annotations

import pytest

P = [1, 2, 3, 4, 5]


def _alloc(core):
    """An allocator (8 blocks of 4) where sequence 1 holds blocks [0, 1]."""
    alloc = core.BlockAllocator(8, 4)
    alloc.allocate(1, P, 5)
    return alloc


def _assert_alloc_usable(alloc) -> None:
    """Sequence 1 still holds [0, 1]; a new sequence gets the first free block."""
    assert alloc.block_table(1) == [0, 1]
    first_free = alloc.free_block_ids()[0]
    assert alloc.allocate(99, [7], 1) == 0
    assert alloc.block_table(99) == [first_free]


def _sched(core, **kwargs):
    """A scheduler (8 blocks of 4) with request 1 waiting."""
    sched = core.Scheduler(8, 4, **kwargs)
    sched.add_request(1, P, max_tokens=3)
    return sched


def _open_step(core, **kwargs):
    """A scheduler with requests 1 (5 tokens) and 2 (3 tokens) scheduled in an open step."""
    sched = _sched(core, **kwargs)
    sched.add_request(2, [6, 7, 8], max_tokens=3)
    sched.schedule()
    return sched


def _assert_step_closes(sched) -> None:
    """The open step is intact: update() takes one token per row."""
    assert sched.update([9, 9]).req_ids.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0, 4), "num_blocks"),
        ((-1, 4), "num_blocks"),
        ((4, 0), "block_size"),
        ((4, -2), "block_size"),
    ],
)
def test_allocator_rejects_bad_sizes(core, args, field) -> None:
    with pytest.raises(ValueError, match=field):
        core.BlockAllocator(*args)
    assert core.BlockAllocator(1, 1).num_free_blocks == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((0, 4), {}, "num_blocks"),
        ((4, 0), {}, "block_size"),
        ((4, -1), {}, "block_size"),
        ((4, 4), {"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ((4, 4), {"max_num_seqs": -1}, "max_num_seqs"),
        ((4, 4), {"max_model_len": 0}, "max_model_len"),
    ],
)
def test_scheduler_rejects_bad_sizes(core, args, kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        core.Scheduler(*args, **kwargs)
    assert core.Scheduler(1, 1).num_waiting == 0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0, 1, 1, 1), "max_num_seqs"),
        ((1, 0, 1, 1), "max_num_batched_tokens"),
        ((1, 1, -1, 1), "max_blocks_per_seq"),
        ((1, 1, 1, 0), "block_size"),
    ],
)
def test_batch_builder_rejects_bad_sizes(core, args, field) -> None:
    with pytest.raises(ValueError, match=field):
        core.BatchBuilder(*args)
    assert core.BatchBuilder(1, 1, 1, 1).num_tokens == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.block_table(7),
        lambda a: a.free(7),
        lambda a: a.fork(7, 8),
        lambda a: a.append_slots(7, 0, 1),
        lambda a: a.cache_blocks(7, [1], 1),
    ],
    ids=["block_table", "free", "fork", "append_slots", "cache_blocks"],
)
def test_allocator_unknown_sequence(core, call) -> None:
    alloc = _alloc(core)
    with pytest.raises(ValueError, match="unknown sequence"):
        call(alloc)
    assert not alloc.has_seq(8)
    _assert_alloc_usable(alloc)


def test_allocator_double_free(core) -> None:
    alloc = _alloc(core)
    alloc.allocate(2, [9], 1)
    alloc.free(2)
    free_before = alloc.free_block_ids()
    with pytest.raises(ValueError, match="unknown sequence"):
        alloc.free(2)
    assert alloc.free_block_ids() == free_before
    assert alloc.ref_count(2) == 0
    _assert_alloc_usable(alloc)


def test_allocator_duplicate_sequence_ids(core) -> None:
    alloc = _alloc(core)
    alloc.allocate(2, [9], 1)
    with pytest.raises(ValueError, match="already has blocks"):
        alloc.allocate(2, [9], 1)
    with pytest.raises(ValueError, match="already has blocks"):
        alloc.fork(1, 2)
    assert [alloc.ref_count(b) for b in range(3)] == [1, 1, 1]
    alloc.free(2)
    _assert_alloc_usable(alloc)


@pytest.mark.parametrize(
    ("tokens", "num_tokens", "field"),
    [
        ([1, 2], 0, "num_tokens"),
        ([1, 2], 3, "num_tokens"),
        ([], 1, "num_tokens"),
        ([1, -1], 2, "token_ids"),
        ([1, 2**31], 2, "token_ids"),
    ],
)
def test_allocate_rejects_bad_arguments(core, tokens, num_tokens, field) -> None:
    alloc = _alloc(core)
    with pytest.raises(ValueError, match=field):
        alloc.allocate(2, tokens, num_tokens)
    assert not alloc.has_seq(2)
    assert alloc.stats()["prefix_query_tokens"] == 5
    _assert_alloc_usable(alloc)


@pytest.mark.parametrize(("computed", "total"), [(5, 5), (-1, 3), (9, 10), (6, 5)])
def test_append_slots_rejects_bad_counts(core, computed, total) -> None:
    alloc = _alloc(core)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        alloc.append_slots(1, computed, total)
    _assert_alloc_usable(alloc)


@pytest.mark.parametrize("computed", [-1, 6])
def test_cache_blocks_rejects_bad_counts(core, computed) -> None:
    alloc = _alloc(core)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        alloc.cache_blocks(1, P, computed)
    assert alloc.num_cached_blocks == 0
    _assert_alloc_usable(alloc)


def test_num_cached_prefix_tokens_rejects_bad_token_ids(core) -> None:
    alloc = _alloc(core)
    with pytest.raises(ValueError, match="token_ids"):
        alloc.num_cached_prefix_tokens([1, -5])
    _assert_alloc_usable(alloc)


@pytest.mark.parametrize("block_id", [-1, 8, 1000])
def test_bad_block_id_raises_index_error(core, block_id) -> None:
    alloc = _alloc(core)
    with pytest.raises(IndexError, match="out of range"):
        alloc.ref_count(block_id)
    with pytest.raises(IndexError, match="out of range"):
        alloc.cached_block_hash(block_id)
    assert alloc.ref_count(7) == 0
    _assert_alloc_usable(alloc)


@pytest.mark.parametrize(
    ("prompt", "kwargs", "field"),
    [
        ([], {}, "empty"),
        ([1, -1], {}, "prompt_token_ids"),
        ([1, 2**31], {}, "prompt_token_ids"),
        ([1], {"eos_token_ids": [-1]}, "eos_token_ids"),
        ([1], {"stop_token_ids": [2**31]}, "stop_token_ids"),
        ([1], {"max_tokens": 0}, "max_tokens"),
        ([1], {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ([1], {"min_tokens": -1}, "min_tokens"),
        ([1] * 64, {}, "max_model_len"),
        ([1] * 10, {"max_tokens": 30}, "KV blocks"),
    ],
)
def test_add_request_rejects_bad_requests(core, step, prompt, kwargs, field) -> None:
    sched = _sched(core, max_model_len=64)
    kwargs = {"max_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=field):
        sched.add_request(2, prompt, **kwargs)
    assert not sched.has_request(2)
    assert sched.waiting_ids() == [1]
    sched.add_request(2, [1], max_tokens=1)
    out, _ = step(sched)
    assert out.req_ids.tolist() == [1, 2]


def test_add_request_rejects_duplicate_id(core) -> None:
    sched = _sched(core)
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request(1, [9], max_tokens=1)
    assert sched.request_info(1)["num_prompt_tokens"] == 5
    assert sched.waiting_ids() == [1]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.abort(7),
        lambda s: s.fork(7, 8),
        lambda s: s.request_info(7),
    ],
    ids=["abort", "fork", "request_info"],
)
def test_scheduler_unknown_request(core, step, call) -> None:
    sched = _sched(core)
    with pytest.raises(ValueError, match="unknown request"):
        call(sched)
    assert not sched.has_request(8)
    out, _ = step(sched)
    assert out.req_ids.tolist() == [1]


def test_fork_rejects_waiting_parent_and_existing_child(core, step) -> None:
    sched = _sched(core)
    sched.add_request(2, [9], max_tokens=3)
    with pytest.raises(ValueError, match="not running"):
        sched.fork(1, 3)
    step(sched)
    with pytest.raises(ValueError, match="already exists"):
        sched.fork(1, 2)
    assert sched.running_ids() == [1, 2]
    assert sched.fork(1, 3) is True


def test_schedule_twice_without_update(core) -> None:
    sched = _open_step(core)
    with pytest.raises(RuntimeError, match="twice"):
        sched.schedule()
    _assert_step_closes(sched)
    assert sched.schedule().req_ids.tolist() == [1, 2]


def test_update_without_a_step(core, step) -> None:
    sched = _sched(core)
    with pytest.raises(RuntimeError, match="without a scheduled step"):
        sched.update([])
    out, _ = step(sched)
    assert out.req_ids.tolist() == [1]


@pytest.mark.parametrize("tokens", [[9], [9, 9, 9], []])
def test_update_with_wrong_number_of_tokens(core, tokens) -> None:
    sched = _open_step(core)
    with pytest.raises(ValueError, match="expected 2 sampled token ids"):
        sched.update(tokens)
    _assert_step_closes(sched)


@pytest.mark.parametrize("bad", [-1, 2**31])
def test_update_with_out_of_range_token(core, bad) -> None:
    sched = _open_step(core)
    with pytest.raises(ValueError, match="sampled token ids"):
        sched.update([9, bad])
    assert sched.request_info(1)["output_token_ids"] == []
    _assert_step_closes(sched)


def test_build_without_a_step(core) -> None:
    sched = _sched(core)
    builder = core.BatchBuilder.for_scheduler(sched)
    with pytest.raises(RuntimeError, match="build"):
        builder.build(sched)
    sched.schedule()
    assert builder.build(sched) == 5


@pytest.mark.parametrize(
    ("sizes", "pad_to", "field"),
    [
        ((1, 64, 8, 4), 0, "max_num_seqs"),
        ((4, 7, 8, 4), 0, "max_num_batched_tokens"),
        ((4, 64, 8, 4), 65, "max_num_batched_tokens"),
        ((4, 64, 1, 4), 0, "max_blocks_per_seq"),
        ((4, 64, 8, 8), 0, "block_size"),
    ],
)
def test_build_into_too_small_buffers(core, sizes, pad_to, field) -> None:
    sched = _open_step(core)  # 2 rows, 8 tokens, request 1 needs 2 blocks
    with pytest.raises(ValueError, match=field):
        core.BatchBuilder(*sizes).build(sched, pad_to=pad_to)
    assert core.BatchBuilder(4, 64, 8, 4).build(sched) == 8
    _assert_step_closes(sched)


def test_build_after_a_row_was_aborted(core) -> None:
    sched = _open_step(core)
    sched.abort(2)
    builder = core.BatchBuilder.for_scheduler(sched)
    with pytest.raises(ValueError, match="aborted"):
        builder.build(sched)
    assert sched.update([9, 9]).req_ids.tolist() == [1]
    sched.schedule()
    assert builder.build(sched) == 1
