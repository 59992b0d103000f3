"""Continuous-batching scheduler (reference of ``helixflow._native.Scheduler``).

One scheduling model for every phase: each request has ``num_computed_tokens`` catching up to
its ``num_tokens`` (prompt + output). Each ``schedule()`` hands out one token budget
(``max_num_batched_tokens``):

1. Running requests, in queue order, each get ``min(num_tokens - num_computed_tokens, budget)``
   tokens; so decodes take one token and a long prompt is prefilled in chunks across steps.
   When the KV cache is out of blocks, the last running request (lowest priority, newest) is
   preempted: its blocks are freed, its progress reset to zero (recompute; the prefix cache
   usually gives most of it back) and it is re-queued ahead of every later arrival.
2. If nobody was preempted, waiting requests are admitted in queue order while budget, blocks
   and ``max_num_seqs`` allow; the first that does not fit stops admission (strict order).

Queue order is ``(priority, arrival)``: lower priority values first, then first come first
served. A request keeps its arrival rank when preempted, which is what puts it back in front.

``update(sampled_token_ids)`` takes one sampled token per scheduled request (then one per child
forked during the step); a request whose prompt is still being prefilled ignores its token.
It appends tokens, checks stop conditions and returns what is new and what finished.

Failure kinds: misuse (unknown/duplicate ids, bad parameters, calls out of order) raises
``ValueError`` / ``RuntimeError``; oversize prompts are refused at ``add_request``.
Not thread-safe: one engine thread owns it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from helixflow.pool.reference.block_allocator import BlockAllocator, cdiv

_I32_MAX = 2**31 - 1
_INHERITED_BY_FORK = (
    "num_prompt_tokens", "num_computed_tokens", "num_scheduled", "priority", "max_tokens",
    "min_tokens", "eos_token_ids", "stop_token_ids", "ignore_eos",
)  # fmt: skip


class _Request:
    __slots__ = (
        "arrival", "eos_token_ids", "finished", "ignore_eos", "max_tokens", "min_tokens",
        "num_computed_tokens", "num_preemptions", "num_prompt_tokens", "num_scheduled",
        "priority", "request_id", "running", "stop_token_ids", "token_ids",
    )  # fmt: skip

    def __init__(self, request_id: int, token_ids: list[int], arrival: int) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_scheduled = 0  # tokens scheduled in the step in progress
        self.arrival = arrival
        self.priority = 0
        self.max_tokens = 1
        self.min_tokens = 0
        self.eos_token_ids: frozenset[int] = frozenset()
        self.stop_token_ids: frozenset[int] = frozenset()
        self.ignore_eos = False
        self.running = False
        self.finished = False
        self.num_preemptions = 0

    def key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)


class SchedulerOutput:
    """What one ``schedule()`` decided. Arrays are in batch order."""

    def __init__(
        self,
        req_ids: list[int],
        num_scheduled_tokens: list[int],
        num_computed_tokens: list[int],
        preempted_ids: list[int],
        blocks_to_copy: list[tuple[int, int]],
    ) -> None:
        self.req_ids: npt.NDArray[np.int64] = np.array(req_ids, dtype=np.int64)
        self.num_scheduled_tokens: npt.NDArray[np.int32] = np.array(
            num_scheduled_tokens, dtype=np.int32
        )
        self.num_computed_tokens: npt.NDArray[np.int32] = np.array(
            num_computed_tokens, dtype=np.int32
        )
        self.total_num_scheduled_tokens = sum(num_scheduled_tokens)
        self.preempted_ids = preempted_ids
        self.blocks_to_copy = blocks_to_copy

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


class UpdateOutput:
    """What one ``update()`` produced: new tokens (in step order) and finished requests."""

    def __init__(
        self, req_ids: list[int], token_ids: list[int], finished: list[tuple[int, str]]
    ) -> None:
        self.req_ids: npt.NDArray[np.int64] = np.array(req_ids, dtype=np.int64)
        self.token_ids: npt.NDArray[np.int32] = np.array(token_ids, dtype=np.int32)
        self.finished = finished


class Scheduler:
    """Token-budget scheduler over a paged KV cache (it owns the ``BlockAllocator``)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int = 4096,
        enable_prefix_caching: bool = True,
    ) -> None:
        for name, value in (
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self._max_num_batched_tokens = max_num_batched_tokens
        self._max_num_seqs = max_num_seqs
        self._max_model_len = max_model_len
        self._requests: dict[int, _Request] = {}
        self._waiting: list[_Request] = []  # sorted by key()
        self._running: list[_Request] = []  # sorted by key()
        self._step: list[_Request] | None = None  # scheduled (then forked) in the open step
        self._num_step_rows = 0  # how many of _step schedule() put there (the batch rows)
        self._num_arrivals = 0
        self._num_preemptions = 0

    @property
    def allocator(self) -> BlockAllocator:
        return self._allocator

    @property
    def block_size(self) -> int:
        return self._allocator.block_size

    @property
    def max_num_batched_tokens(self) -> int:
        return self._max_num_batched_tokens

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_request(self, request_id: int) -> bool:
        return request_id in self._requests

    def waiting_ids(self) -> list[int]:
        return [r.request_id for r in self._waiting]

    def running_ids(self) -> list[int]:
        return [r.request_id for r in self._running]

    def request_info(self, request_id: int) -> dict[str, object]:
        r = self._get(request_id)
        return {
            "status": "running" if r.running else "waiting",
            "num_prompt_tokens": r.num_prompt_tokens,
            "num_tokens": len(r.token_ids),
            "num_computed_tokens": r.num_computed_tokens,
            "output_token_ids": r.token_ids[r.num_prompt_tokens :],
            "num_preemptions": r.num_preemptions,
            "priority": r.priority,
        }

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_preemptions": self._num_preemptions,
            "kv_cache_usage": self._allocator.usage,
        }

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: int,
        prompt_token_ids: Sequence[int],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        eos_token_ids: Sequence[int] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        priority: int = 0,
    ) -> None:
        """Queue a request. Raises ``ValueError`` for a bad or oversize one."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id} already exists")
        prompt = [int(t) for t in prompt_token_ids]
        n = len(prompt)
        if n == 0:
            raise ValueError("prompt_token_ids is empty")
        for name, ids in (("prompt_token_ids", prompt), ("eos_token_ids", eos_token_ids),
                          ("stop_token_ids", stop_token_ids)):  # fmt: skip
            if any(not 0 <= t <= _I32_MAX for t in ids):
                raise ValueError(f"{name} must hold token ids in [0, 2**31)")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= min_tokens <= max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}"
            )
        if n >= self._max_model_len:
            raise ValueError(
                f"prompt has {n} tokens but max_model_len is {self._max_model_len}: "
                "no room to generate"
            )
        # The last token's KV is never computed, hence the - 1.
        needed = cdiv(min(n + max_tokens, self._max_model_len) - 1, self.block_size)
        if needed > self._allocator.num_blocks:
            raise ValueError(
                f"request needs {needed} KV blocks but the cache has {self._allocator.num_blocks}"
            )
        req = _Request(request_id, prompt, self._num_arrivals)
        self._num_arrivals += 1
        req.max_tokens, req.min_tokens, req.priority = max_tokens, min_tokens, priority
        req.eos_token_ids = frozenset(eos_token_ids)
        req.stop_token_ids = frozenset(stop_token_ids)
        req.ignore_eos = ignore_eos
        self._requests[request_id] = req
        bisect.insort(self._waiting, req, key=_Request.key)

    def abort(self, request_id: int) -> None:
        """Drop a request now; its KV blocks are free on return (even mid-step)."""
        req = self._get(request_id)
        del self._requests[request_id]
        req.finished = True
        if req.running:
            self._running.remove(req)
            self._allocator.free(request_id)
        else:
            self._waiting.remove(req)

    def fork(self, parent_id: int, child_id: int) -> bool:
        """Add ``child_id`` as a copy of a running request, sharing its KV blocks (COW).

        Called between ``schedule()`` and ``update()`` for a parent scheduled in that step, the
        child joins the step: ``update()`` expects one more sampled token, after the scheduled
        ones, for each such child in fork order. Returns ``False`` when ``max_num_seqs``
        requests are already running.
        """
        parent = self._get(parent_id)
        if not parent.running:
            raise ValueError(f"request {parent_id} is not running")
        if child_id in self._requests:
            raise ValueError(f"request {child_id} already exists")
        if len(self._running) >= self._max_num_seqs:
            return False
        child = _Request(child_id, list(parent.token_ids), self._num_arrivals)
        self._num_arrivals += 1
        for attr in _INHERITED_BY_FORK:
            setattr(child, attr, getattr(parent, attr))
        child.running = True
        self._allocator.fork(parent_id, child_id)
        self._requests[child_id] = child
        bisect.insort(self._running, child, key=_Request.key)
        if self._step is not None and parent.num_scheduled > 0:
            self._step.append(child)
        return True

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step (see the module docstring)."""
        if self._step is not None:
            raise RuntimeError("schedule() called twice: update() must close the previous step")
        alloc = self._allocator
        budget = self._max_num_batched_tokens
        step: list[_Request] = []
        computed: list[int] = []
        preempted: list[int] = []
        copies: list[tuple[int, int]] = []

        i = 0
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            num_new = min(len(req.token_ids) - req.num_computed_tokens, budget)
            end = req.num_computed_tokens + num_new
            while (got := alloc.append_slots(req.request_id, req.num_computed_tokens, end)) is None:
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if got is None:
                break
            copies.extend(got)
            req.num_scheduled = num_new
            step.append(req)
            computed.append(req.num_computed_tokens)
            budget -= num_new
            i += 1

        while (not preempted and self._waiting and budget > 0
               and len(self._running) < self._max_num_seqs):  # fmt: skip
            req = self._waiting[0]
            num_cached = alloc.num_cached_prefix_tokens(req.token_ids)
            num_new = min(len(req.token_ids) - num_cached, budget)
            got_cached = alloc.allocate(req.request_id, req.token_ids, num_cached + num_new)
            if got_cached is None:
                break
            assert got_cached == num_cached
            del self._waiting[0]
            req.running = True
            req.num_computed_tokens = num_cached
            req.num_scheduled = num_new
            bisect.insort(self._running, req, key=_Request.key)
            step.append(req)
            computed.append(num_cached)
            budget -= num_new

        self._step = step
        self._num_step_rows = len(step)
        return SchedulerOutput(
            [r.request_id for r in step], [r.num_scheduled for r in step], computed,
            preempted, copies,
        )  # fmt: skip

    def update(self, sampled_token_ids: Sequence[int] | npt.NDArray[np.integer]) -> UpdateOutput:
        """Close the step: one sampled token per scheduled request, then per forked child."""
        step = self._step
        if step is None:
            raise RuntimeError("update() called without a scheduled step")
        sampled = np.asarray(sampled_token_ids, dtype=np.int64).reshape(-1).tolist()
        if len(sampled) != len(step):
            raise ValueError(f"expected {len(step)} sampled token ids, got {len(sampled)}")
        if any(not 0 <= t <= _I32_MAX for t in sampled):
            raise ValueError("sampled token ids must be in [0, 2**31)")
        self._step = None
        alloc = self._allocator
        new_ids: list[int] = []
        new_tokens: list[int] = []
        finished: list[tuple[int, str]] = []
        for req, token in zip(step, sampled, strict=True):
            if req.finished:  # aborted during the step
                continue
            req.num_computed_tokens += req.num_scheduled
            req.num_scheduled = 0
            alloc.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
            if req.num_computed_tokens < len(req.token_ids):
                continue  # prompt chunk: no token yet
            req.token_ids.append(token)
            new_ids.append(req.request_id)
            new_tokens.append(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                req.finished = True
                finished.append((req.request_id, reason))
        if finished:
            self._running = [r for r in self._running if not r.finished]
            for rid, _ in finished:
                del self._requests[rid]
                alloc.free(rid)
        return UpdateOutput(new_ids, new_tokens, finished)

    # ---- internals --------------------------------------------------------------------------
    def _step_rows(self) -> list[_Request]:
        """The open step's scheduled requests, in batch order (for ``BatchBuilder``)."""
        if self._step is None:
            raise RuntimeError("build() needs a step: call scheduler.schedule() first")
        return self._step[: self._num_step_rows]

    def _get(self, request_id: int) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"unknown request {request_id}")
        return req

    def _preempt(self, req: _Request) -> None:
        self._allocator.free(req.request_id)
        req.running = False
        req.num_computed_tokens = 0
        req.num_scheduled = 0
        req.num_preemptions += 1
        self._num_preemptions += 1
        bisect.insort(self._waiting, req, key=_Request.key)

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        num_output = len(req.token_ids) - req.num_prompt_tokens
        if num_output >= req.min_tokens and (
            (not req.ignore_eos and token in req.eos_token_ids) or token in req.stop_token_ids
        ):
            return "stop"
        if num_output >= req.max_tokens or len(req.token_ids) >= self._max_model_len:
            return "length"
        return None
