"""Scheduler: chunked prefill, batch order, admission, preemption, priorities, aborts, stop
conditions and forks, checked step by step."""

from __future__ import annotations

import pytest

P = list(range(100, 120))  # prompt token ids
Q = list(range(200, 220))
R = list(range(300, 320))


def test_long_prompt_is_prefilled_in_chunks_then_decoded(core, step, rows) -> None:
    sched = core.Scheduler(16, 4, max_num_batched_tokens=4)
    sched.add_request(1, P[:10], max_tokens=3)
    chunks = []
    for _ in range(3):
        out, upd = step(sched, 50)
        chunks.append(rows(out)[0])
    assert chunks == [(1, 4, 0), (1, 4, 4), (1, 2, 8)]
    assert upd.req_ids.tolist() == [1]
    out, _ = step(sched, 51)
    assert rows(out) == [(1, 1, 10)]
    assert sched.request_info(1)["output_token_ids"] == [50, 51]


def test_prompt_chunk_rows_ignore_their_sampled_token(core, step) -> None:
    sched = core.Scheduler(16, 4, max_num_batched_tokens=4)
    sched.add_request(1, P[:10], max_tokens=3)
    _, upd = step(sched, 50)
    assert upd.req_ids.tolist() == []
    assert upd.token_ids.tolist() == []
    assert upd.finished == []
    info = sched.request_info(1)
    assert (info["num_tokens"], info["num_computed_tokens"]) == (10, 4)
    assert info["output_token_ids"] == []


def test_scheduler_output_fields(core, rows) -> None:
    sched = core.Scheduler(16, 4, max_num_batched_tokens=6)
    sched.add_request(1, P[:4], max_tokens=3)
    sched.add_request(2, Q[:4], max_tokens=3)
    out = sched.schedule()
    assert rows(out) == [(1, 4, 0), (2, 2, 0)]
    assert out.num_reqs == 2
    assert out.total_num_scheduled_tokens == 6
    assert (out.preempted_ids, out.blocks_to_copy) == ([], [])
    assert (out.req_ids.dtype, out.num_scheduled_tokens.dtype) == ("int64", "int32")
    assert out.num_computed_tokens.dtype == "int32"


def test_running_decodes_come_before_new_prefills_in_one_step(core, step, rows) -> None:
    sched = core.Scheduler(32, 4, max_num_batched_tokens=8)
    sched.add_request(1, P[:3], max_tokens=5)
    sched.add_request(2, Q[:4], max_tokens=5)
    out, _ = step(sched)
    assert rows(out) == [(1, 3, 0), (2, 4, 0)]
    sched.add_request(3, R[:10], max_tokens=5)
    out, upd = step(sched, [61, 62, 63])
    assert rows(out) == [(1, 1, 3), (2, 1, 4), (3, 6, 0)]
    assert upd.req_ids.tolist() == [1, 2]
    assert upd.token_ids.tolist() == [61, 62]
    out, upd = step(sched, [71, 72, 73])
    assert rows(out) == [(1, 1, 4), (2, 1, 5), (3, 4, 6)]
    assert upd.req_ids.tolist() == [1, 2, 3]
    assert upd.token_ids.tolist() == [71, 72, 73]
    assert sched.running_ids() == [1, 2, 3]


def test_budget_cuts_later_rows(core, rows) -> None:
    """The token budget runs out mid-queue: the last row gets the rest, later ones nothing."""
    sched = core.Scheduler(32, 4, max_num_batched_tokens=5)
    for rid, prompt in ((1, P[:3]), (2, Q[:3]), (3, R[:3])):
        sched.add_request(rid, prompt, max_tokens=5)
    out = sched.schedule()
    assert rows(out) == [(1, 3, 0), (2, 2, 0)]
    assert sched.running_ids() == [1, 2]
    assert sched.waiting_ids() == [3]


def test_max_num_seqs_caps_running_requests(core, step, rows) -> None:
    sched = core.Scheduler(32, 4, max_num_seqs=2)
    sched.add_request(1, P[:2], max_tokens=1)
    sched.add_request(2, Q[:2], max_tokens=5)
    sched.add_request(3, R[:2], max_tokens=5)
    out, upd = step(sched)
    assert rows(out) == [(1, 2, 0), (2, 2, 0)]
    assert upd.finished == [(1, "length")]
    assert sched.waiting_ids() == [3]
    out, _ = step(sched)
    assert rows(out) == [(2, 1, 2), (3, 2, 0)]
    assert (sched.num_running, sched.num_waiting) == (2, 0)


def test_admission_is_strict_fcfs_when_blocks_are_short(core, rows) -> None:
    """Request 2 does not fit; request 3 would, but may not overtake it."""
    sched = core.Scheduler(4, 4)
    sched.add_request(1, P[:9], max_tokens=2)  # 3 blocks
    sched.add_request(2, Q[:8], max_tokens=1)  # 2 blocks, 1 free
    sched.add_request(3, R[:2], max_tokens=1)  # 1 block
    out = sched.schedule()
    assert rows(out) == [(1, 9, 0)]
    assert sched.waiting_ids() == [2, 3]
    assert sched.allocator.num_free_blocks == 1


def _preemption_setup(core, step):
    """Two 7-token prompts fill all 4 blocks; at the third step request 1 needs a block."""
    sched = core.Scheduler(4, 4)
    sched.add_request(1, P[:7], max_tokens=4)
    sched.add_request(2, Q[:7], max_tokens=4)
    step(sched, [11, 21])
    step(sched, [12, 22])
    sched.add_request(3, R[:2], max_tokens=1)
    return sched


def test_newest_running_request_is_preempted_when_blocks_run_out(core, step, rows) -> None:
    sched = _preemption_setup(core, step)
    assert sched.allocator.block_table(2) == [2, 3]
    out, _ = step(sched, 13)
    assert out.preempted_ids == [2]
    assert rows(out) == [(1, 1, 8)]  # nobody is admitted in a step that preempts
    assert sched.allocator.block_table(1) == [0, 1, 3]  # request 2's tail block, evicted
    assert not sched.allocator.has_seq(2)
    assert sched.running_ids() == [1]
    assert sched.waiting_ids() == [2, 3]  # back in front of the later arrival
    info = sched.request_info(2)
    assert info["status"] == "waiting"
    assert info["num_computed_tokens"] == 0
    assert info["num_preemptions"] == 1
    assert info["output_token_ids"] == [21, 22]
    assert sched.stats()["num_preemptions"] == 1


def test_preempted_request_recomputes_and_keeps_its_output(core, step, rows) -> None:
    sched = _preemption_setup(core, step)
    step(sched, 13)  # preempts 2
    out, upd = step(sched, 14)
    assert rows(out) == [(1, 1, 9)]  # 2 still does not fit
    assert upd.finished == [(1, "length")]
    out, upd = step(sched, [23, 31])
    assert rows(out) == [(2, 5, 4), (3, 2, 0)]  # 2's first block was still cached
    assert upd.req_ids.tolist() == [2, 3]
    assert upd.finished == [(3, "length")]
    assert sched.request_info(2)["output_token_ids"] == [21, 22, 23]
    out, upd = step(sched, 24)
    assert rows(out) == [(2, 1, 9)]
    assert upd.finished == [(2, "length")]
    assert upd.token_ids.tolist() == [24]


def test_no_request_is_admitted_in_a_step_that_preempts(core, step, rows) -> None:
    """Request 3 (higher priority) would fit in the block left free, but waits a step."""
    sched = _preemption_setup(core, step)
    sched.abort(3)
    sched.add_request(4, R[:2], max_tokens=1, priority=-1)
    out, _ = step(sched, 13)
    assert out.preempted_ids == [2]
    assert rows(out) == [(1, 1, 8)]
    assert sched.allocator.num_free_blocks == 1
    assert sched.waiting_ids() == [4, 2]
    out, _ = step(sched, [14, 41])
    assert rows(out) == [(1, 1, 9), (4, 2, 0)]


def test_last_running_request_preempts_itself(core, step, rows) -> None:
    sched = core.Scheduler(4, 4)
    sched.add_request(1, P[:6], max_tokens=3)  # 2 blocks, room to decode in block 1
    sched.add_request(2, Q[:8], max_tokens=3)  # 2 blocks, full: needs a third to decode
    step(sched, [11, 21])
    out, _ = step(sched, 12)
    assert out.preempted_ids == [2]
    assert rows(out) == [(1, 1, 6)]
    assert sched.waiting_ids() == [2]
    assert sched.request_info(2)["output_token_ids"] == [21]


def test_priority_orders_queues_then_fcfs(core, rows) -> None:
    sched = core.Scheduler(32, 4)
    for rid, prio in ((1, 1), (2, 0), (3, 1), (4, 0), (5, -1)):
        sched.add_request(rid, [rid + 10], max_tokens=2, priority=prio)
    assert sched.waiting_ids() == [5, 2, 4, 1, 3]
    assert sched.request_info(5)["priority"] == -1
    out = sched.schedule()
    assert out.req_ids.tolist() == [5, 2, 4, 1, 3]
    assert sched.running_ids() == [5, 2, 4, 1, 3]


def test_higher_priority_arrival_is_admitted_and_runs_first(core, step, rows) -> None:
    sched = core.Scheduler(32, 4)
    sched.add_request(1, P[:3], max_tokens=5, priority=1)
    step(sched)
    sched.add_request(2, Q[:3], max_tokens=5, priority=0)
    out, _ = step(sched)
    assert rows(out) == [(1, 1, 3), (2, 3, 0)]
    assert sched.running_ids() == [2, 1]
    out, _ = step(sched)
    assert rows(out) == [(2, 1, 3), (1, 1, 4)]


def test_abort_waiting_request(core) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:3], max_tokens=2)
    sched.add_request(2, Q[:3], max_tokens=2)
    sched.abort(1)
    assert not sched.has_request(1)
    assert sched.waiting_ids() == [2]
    assert sched.allocator.num_free_blocks == 8


def test_abort_running_request_frees_its_blocks_at_once(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:10], max_tokens=5)
    step(sched)
    assert sched.allocator.num_free_blocks == 5
    sched.abort(1)
    assert sched.allocator.num_free_blocks == 8
    assert (sched.running_ids(), sched.has_request(1)) == ([], False)
    assert not sched.allocator.has_seq(1)


def test_abort_between_schedule_and_update_skips_the_row(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:3], max_tokens=5)
    sched.add_request(2, Q[:3], max_tokens=5)
    sched.schedule()
    sched.abort(1)
    assert sched.allocator.num_free_blocks == 7
    upd = sched.update([41, 42])  # still one token per scheduled row
    assert upd.req_ids.tolist() == [2]
    assert upd.token_ids.tolist() == [42]
    assert upd.finished == []
    assert sched.running_ids() == [2]
    out, _ = step(sched)
    assert out.req_ids.tolist() == [2]


def test_eos_finishes_with_stop_and_frees_blocks(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=5, eos_token_ids=[9])
    _, upd = step(sched, 8)
    assert upd.finished == []
    _, upd = step(sched, 9)
    assert upd.req_ids.tolist() == [1]
    assert upd.token_ids.tolist() == [9]
    assert upd.finished == [(1, "stop")]
    assert not sched.has_request(1)
    assert sched.allocator.num_free_blocks == 8
    assert sched.num_running == 0


def test_stop_token_finishes_with_stop_even_with_ignore_eos(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=5, stop_token_ids=[8, 9], ignore_eos=True)
    _, upd = step(sched, 8)
    assert upd.finished == [(1, "stop")]


def test_ignore_eos_runs_to_max_tokens(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=3, eos_token_ids=[9], ignore_eos=True)
    finished = [step(sched, 9)[1].finished for _ in range(3)]
    assert finished == [[], [], [(1, "length")]]


def test_min_tokens_suppresses_stop_until_reached(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=5, min_tokens=3, eos_token_ids=[9])
    finished = [step(sched, 9)[1].finished for _ in range(3)]
    assert finished == [[], [], [(1, "stop")]]


def test_max_tokens_finishes_with_length(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=2, eos_token_ids=[9])
    _, upd = step(sched, 3)
    assert upd.finished == []
    _, upd = step(sched, 4)
    assert upd.finished == [(1, "length")]
    assert upd.token_ids.tolist() == [4]


def test_stop_wins_over_length_on_the_last_token(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=1, eos_token_ids=[9])
    _, upd = step(sched, 9)
    assert upd.finished == [(1, "stop")]


def test_max_model_len_finishes_with_length(core, step) -> None:
    sched = core.Scheduler(8, 4, max_model_len=5)
    sched.add_request(1, P[:3], max_tokens=10)
    finished = [step(sched, 1)[1].finished for _ in range(2)]
    assert finished == [[], [(1, "length")]]


def test_update_output_lists_tokens_and_finishes_in_step_order(core, step) -> None:
    sched = core.Scheduler(16, 4)
    sched.add_request(1, P[:3], max_tokens=1)
    sched.add_request(2, Q[:3], max_tokens=4, eos_token_ids=[9])
    sched.add_request(3, R[:3], max_tokens=4)
    _, upd = step(sched, [5, 9, 6])
    assert upd.req_ids.tolist() == [1, 2, 3]
    assert upd.token_ids.tolist() == [5, 9, 6]
    assert (upd.req_ids.dtype, upd.token_ids.dtype) == ("int64", "int32")
    assert upd.finished == [(1, "length"), (2, "stop")]
    assert sched.running_ids() == [3]


def test_identical_prompt_hits_the_prefix_cache(core, step, rows) -> None:
    sched = core.Scheduler(16, 4)
    sched.add_request(1, P[:10], max_tokens=5)
    step(sched)
    sched.add_request(2, P[:10], max_tokens=5)
    out, _ = step(sched)
    assert rows(out) == [(1, 1, 10), (2, 2, 8)]
    alloc = sched.allocator
    assert alloc.block_table(1) == [0, 1, 2]
    assert alloc.block_table(2) == [0, 1, 3]
    assert alloc.stats()["prefix_hit_tokens"] == 8


def test_disabled_prefix_caching_recomputes_identical_prompt(core, step, rows) -> None:
    sched = core.Scheduler(16, 4, enable_prefix_caching=False)
    sched.add_request(1, P[:10], max_tokens=5)
    step(sched)
    sched.add_request(2, P[:10], max_tokens=5)
    out, _ = step(sched)
    assert rows(out) == [(1, 1, 10), (2, 10, 0)]


def test_fork_during_a_step_joins_it_and_copies_on_write(core, step, rows) -> None:
    sched = core.Scheduler(16, 4)
    sched.add_request(1, P[:6], max_tokens=5)
    step(sched, 10)
    sched.schedule()
    assert sched.fork(1, 2) is True
    assert sched.allocator.block_table(2) == [0, 1]
    upd = sched.update([11, 12])  # the scheduled row, then the child
    assert upd.req_ids.tolist() == [1, 2]
    assert upd.token_ids.tolist() == [11, 12]
    assert sched.request_info(1)["output_token_ids"] == [10, 11]
    assert sched.request_info(2)["output_token_ids"] == [10, 12]
    out, _ = step(sched)
    assert rows(out) == [(1, 1, 7), (2, 1, 7)]
    assert out.blocks_to_copy == [(1, 2)]
    assert sched.allocator.block_table(1) == [0, 2]
    assert sched.allocator.block_table(2) == [0, 1]


def test_fork_outside_a_step_adds_a_running_request(core, step, rows) -> None:
    sched = core.Scheduler(16, 4)
    sched.add_request(1, P[:6], max_tokens=5, priority=3)
    step(sched, 10)
    assert sched.fork(1, 2) is True
    info = sched.request_info(2)
    assert (info["status"], info["priority"], info["num_computed_tokens"]) == ("running", 3, 6)
    assert info["output_token_ids"] == [10]
    out, upd = step(sched, [11, 12])
    assert rows(out) == [(1, 1, 6), (2, 1, 6)]
    assert out.blocks_to_copy == [(1, 2)]
    assert upd.req_ids.tolist() == [1, 2]


def test_fork_of_a_parent_left_out_of_the_step_does_not_join_it(core, step, rows) -> None:
    sched = core.Scheduler(16, 4, max_num_batched_tokens=4)
    sched.add_request(1, P[:1], max_tokens=5)
    step(sched, 10)
    sched.add_request(2, Q[:10], max_tokens=5, priority=-1)
    step(sched, [11, 0])
    out = sched.schedule()
    assert rows(out) == [(2, 4, 3)]  # the budget ran out before request 1
    assert sched.fork(1, 3) is True
    assert sched.update([0]).req_ids.tolist() == []
    assert sched.request_info(3)["output_token_ids"] == [10, 11]
    out, _ = step(sched)
    assert rows(out) == [(2, 3, 7), (1, 1, 2)]


def test_fork_refused_when_max_num_seqs_are_running(core, step) -> None:
    sched = core.Scheduler(16, 4, max_num_seqs=1)
    sched.add_request(1, P[:6], max_tokens=5)
    step(sched)
    assert sched.fork(1, 2) is False
    assert not sched.has_request(2)
    assert sched.running_ids() == [1]
    assert sched.allocator.ref_count(0) == 1


def test_request_info_and_stats(core, step) -> None:
    sched = core.Scheduler(8, 4)
    sched.add_request(1, P[:5], max_tokens=5, priority=2)
    sched.add_request(2, Q[:3], max_tokens=5)
    assert sched.request_info(1) == {
        "status": "waiting",
        "num_prompt_tokens": 5,
        "num_tokens": 5,
        "num_computed_tokens": 0,
        "output_token_ids": [],
        "num_preemptions": 0,
        "priority": 2,
    }
    step(sched, 9)
    info = sched.request_info(1)
    assert (info["status"], info["num_tokens"], info["num_computed_tokens"]) == ("running", 6, 5)
    assert info["output_token_ids"] == [9]
    assert sched.stats() == {
        "num_running": 2,
        "num_waiting": 0,
        "num_preemptions": 0,
        "kv_cache_usage": 3 / 8,
    }
    assert (sched.block_size, sched.max_num_batched_tokens) == (4, 2048)
    assert (sched.max_num_seqs, sched.max_model_len) == (256, 4096)


def test_freeing_a_running_sequence_through_the_allocator_is_refused_later(core):
    """Misuse through scheduler.allocator raises instead of touching freed blocks."""
    s = core.Scheduler(8, 4)
    s.add_request(1, [1, 2, 3, 4, 5], max_tokens=5)
    s.schedule()
    s.update([7])
    s.allocator.free(1)
    s.allocator.allocate(2, list(range(10, 19)), 9)
    with pytest.raises(ValueError, match="unknown sequence"):
        s.schedule()
