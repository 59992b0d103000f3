"""``AsyncLLMEngine``: an asyncio front over ``LLMEngine``, one async stream per request.

The engine steps on its own thread (a step is seconds of torch work on CPU and must not block
the event loop); requests and aborts reach it through a queue that is drained before every
step, and each step's outputs are handed back to the event loop with ``call_soon_threadsafe``.
A stream that is closed early (client gone, task cancelled) aborts its request, so its KV
blocks are freed at the next step. If a step raises, every open stream gets the error and the
engine refuses new work (a broken model must not look healthy).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from helixflow.errors import EngineDeadError, HelixFlowError, InvalidRequestError, OverloadedError
from helixflow.pool.llm_engine import LLMEngine, RequestOutput
from helixflow.pool.sampling_params import SamplingParams

log = logging.getLogger("helixflow.pool.engine")


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot the engine thread publishes after every step (safe to read from any thread)."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    kv_cache_free_blocks: int = 0
    tokens_per_second: float = 0.0  # over the last THROUGHPUT_WINDOW seconds
    num_preemptions: int = 0  # since the engine started
    prefix_cache_hit_rate: float = 0.0  # prompt tokens found in the prefix cache / looked up


THROUGHPUT_WINDOW = 5.0


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one choice as one (tokens, text and logprobs joined; the
    later one's state and counts)."""
    return dataclasses.replace(
        then,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        new_text=first.new_text + then.new_text,
        logprobs=first.logprobs + then.logprobs,
    )


def _coalesced(
    items: list[RequestOutput | BaseException],
) -> list[RequestOutput | BaseException]:
    """Consecutive outputs of the same choice merged; errors kept in place."""
    out: list[RequestOutput | BaseException] = []
    for item in items:
        last = out[-1] if out else None
        if (isinstance(item, RequestOutput) and isinstance(last, RequestOutput)
                and last.index == item.index and not last.finished):  # fmt: skip
            out[-1] = merge_outputs(last, item)
        else:
            out.append(item)
    return out


class _Stream:
    """What the engine thread handed over for one request and its reader has not taken yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[RequestOutput | BaseException] = deque()
        self.ready = asyncio.Event()

    def push(self, item: RequestOutput | BaseException) -> None:
        """On the event loop (``call_soon_threadsafe``): never blocks the engine."""
        self.pending.append(item)
        self.ready.set()

    async def take(self) -> list[RequestOutput | BaseException]:
        """Everything pending, at least one item (waits for it)."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        items = list(self.pending)
        self.pending.clear()
        return items


class AsyncLLMEngine:
    """Thread-stepped ``LLMEngine`` with ``generate()`` as an async iterator per request."""

    def __init__(self, engine: LLMEngine, *, max_pending: int = 4096) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue[tuple[str, tuple[object, ...]]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.load = self._snapshot()
        # monotonic time the engine thread last finished a step or found nothing to do
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="helixflow-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False once a step has failed or the engine was shut down."""
        return self._error is None and not self._stop.is_set()

    @property
    def num_streams(self) -> int:
        """Requests currently being served or queued."""
        return len(self._streams)

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them, until it finishes.

        Validation errors of ``add_request`` are raised here; leaving the loop early (or being
        cancelled) aborts the request.
        """
        if self._error is not None:
            raise EngineDeadError("the inference engine failed and must be restarted")
        if len(self._streams) >= self.max_pending:
            raise OverloadedError("too many requests are queued; retry later")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(
                    f"request id {request_id!r} is already in use", param="request_id"
                )
            self._streams[request_id] = stream
        self._submit("add", request_id, list(prompt_ids), params)
        finished = False
        try:
            while True:
                # NOTE: a reader that fell behind gets what piled up for one choice as ONE
                # output, so a slow client costs one message per read, not one per token.
                for item in _coalesced(await stream.take()):
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.request_finished
                    yield item
                    if finished:
                        return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    def inject_fault(self, kind: str, seconds: float = 0.0) -> None:
        """Testing aid: make the engine thread hang for ``seconds`` ("stall") or die ("fail")
        at its next drain, as a wedged or broken model would."""
        if kind not in ("stall", "fail"):
            raise ValueError(f"kind must be 'stall' or 'fail', got {kind!r}")
        self._submit(kind, seconds)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the stepping thread (in-flight streams get ``EngineDeadError``)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------
    def _submit(self, command: str, *args: object) -> None:
        self._commands.put((command, args))
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody listens
                stream.loop.call_soon_threadsafe(stream.push, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "abort":
                self.engine.abort(str(args[0]))
                continue
            if command == "stall":  # fault injection: a step that hangs
                time.sleep(float(args[0]))  # type: ignore[arg-type]
                continue
            if command == "fail":  # fault injection: a step that raises
                raise RuntimeError("injected engine failure")
            request_id, prompt, params = args
            assert isinstance(request_id, str) and isinstance(params, SamplingParams)
            try:
                self.engine.add_request(request_id, prompt, params)  # type: ignore[arg-type]
            except HelixFlowError as err:
                self._deliver(request_id, err)

    def _snapshot(self) -> EngineLoad:
        """Read on the engine thread, between steps: the native objects are not thread-safe."""
        sched = self.engine.scheduler
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW:
            self._recent.popleft()
        tokens = sum(n for _, n in self._recent)
        sched_stats = sched.stats()
        alloc_stats = sched.allocator.stats()
        return EngineLoad(
            num_preemptions=int(sched_stats["num_preemptions"]),
            prefix_cache_hit_rate=alloc_stats["prefix_hit_rate"],
            waiting=sched.num_waiting,
            running=sched.num_running,
            kv_cache_usage=sched.allocator.usage,
            kv_cache_free_blocks=sched.allocator.num_free_blocks,
            tokens_per_second=tokens / THROUGHPUT_WINDOW,
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self.load = self._snapshot()
                    self.last_progress = time.monotonic()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._recent.append((time.monotonic(), len(outputs)))
                self.load = self._snapshot()
                self.last_progress = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # NOTE: any failure must reach every client
            log.exception("engine step failed; the engine stops serving")
            self._error = exc
        error = EngineDeadError("the inference engine stopped")
        if self._error is not None:
            error.__cause__ = self._error
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            self._deliver(request_id, error)
