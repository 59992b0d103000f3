"""``LLMEngine``: the native scheduler, the paged KV cache and a torch model, one step at a time.

A step is: ``Scheduler.schedule()`` (C++) picks the requests and token counts under the budget ->
``BatchBuilder.build()`` (C++) writes flat ids, positions, slots and block tables into buffers
that torch reads without a copy -> the model runs once over the flat batch -> the last position
of every scheduled request gives logits -> per-request adjustments and batched sampling ->
``Scheduler.update()`` appends the tokens and finishes requests on EOS / stop ids / length ->
the detokenizer turns tokens into text and finishes requests on stop strings.

Sampling is batch invariant: each token's randomness comes from a seed derived from the
request's seed and the token's index, never from the batch it happens to run in.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

import helixflow.kernels as K
from helixflow import _native
from helixflow.errors import InvalidRequestError
from helixflow.kernels.reference.sampling import sample_inverse_cdf
from helixflow.pool.detokenizer import Decoder, IncrementalDetokenizer
from helixflow.pool.logits_processing import RowState, process_logits, top_logprobs
from helixflow.pool.models.config import AttentionMetadata
from helixflow.pool.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def token_seed(seed: int, index: int) -> int:
    """The sampling seed of a request's ``index``-th token: a signed 64-bit mix of both."""
    x = (seed * _GOLDEN + index * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 29
    return x - (1 << 64) if x >= 1 << 63 else x


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of an ``n > 1`` request; choice 0 keeps the request's seed
    (so it draws what the same request with ``n = 1`` would)."""
    return seed if index == 0 else token_seed(seed, -index)


class CausalLM(Protocol):
    """What the engine needs of a model (``helixflow.pool.models.llama.LlamaForCausalLM``)."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class DecodeReplayer(Protocol):
    """Replays captured decode steps (``helixflow.pool.cuda_graphs.DecodeGraphs``)."""

    def run(
        self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
        block_tables: np.ndarray, seq_lens: np.ndarray,
    ) -> torch.Tensor | None: ...  # fmt: skip


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step produced for one choice of a request: new tokens, the text they settled.

    ``finished`` says this choice is done; ``request_finished`` that every choice of the
    request is (the same thing when ``n == 1``): no more outputs come for the request then.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0
    request_finished: bool = False


@dataclass
class _Request:
    """One choice of a request (one sequence in the scheduler)."""

    request_id: str
    native_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detok: IncrementalDetokenizer
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    # choices 1 .. n-1, forked from this one (sharing its prompt's KV blocks) once its prompt
    # is computed; until then they are known to the engine only
    children: list[_Request] = field(default_factory=list)


class LLMEngine:
    """Continuous batching over one model.

    ``model`` follows the HelixFlow model protocol: ``forward(input_ids, positions, kv_caches,
    meta) -> hidden`` and ``compute_logits(hidden) -> logits``. ``kv_caches`` holds one
    ``(key_cache, value_cache)`` pair per layer of ``num_blocks`` blocks.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Decoder,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        eos_token_ids: Sequence[int],
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
    ) -> None:
        num_blocks, block_size = kv_caches[0][0].shape[:2]
        self.model = model
        self.tokenizer = tokenizer
        self.kv_caches = kv_caches
        self.device = kv_caches[0][0].device
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = int(block_size)
        self.scheduler = _native.Scheduler(
            int(num_blocks), int(block_size), max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        )  # fmt: skip
        self.builder = _native.BatchBuilder.for_scheduler(self.scheduler)
        self._requests: dict[str, list[_Request]] = {}  # request id -> its choices
        self._by_native: dict[int, _Request] = {}  # the choices the scheduler knows
        self._ids = itertools.count(1)
        # CUDA graphs of the decode step (helixflow.pool.cuda_graphs), set by the runner on CUDA
        self.graphs: DecodeReplayer | None = None
        self._entropy = random.SystemRandom()

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises ``InvalidRequestError`` for a prompt that cannot be served."""
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError("the prompt holds token ids outside the vocabulary",
                                      param="prompt")  # fmt: skip
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.max_model_len} tokens", param="messages", code="context_length_exceeded",
            )  # fmt: skip
        seed = params.seed if params.seed is not None else self._entropy.getrandbits(63)
        choices = [
            _Request(request_id, next(self._ids), prompt, params, choice_seed(seed, i),
                     IncrementalDetokenizer(self.tokenizer, prompt, stop=params.stop), index=i)
            for i in range(params.n)
        ]  # fmt: skip
        self._schedule_choice(choices[0])
        choices[0].children = choices[1:]
        self._requests[request_id] = choices

    def _schedule_choice(self, req: _Request) -> None:
        """Hand a choice to the scheduler as a request of its own (prompt computed anew, or
        found in the prefix cache)."""
        p = req.params
        room = self.max_model_len - len(req.prompt_ids)
        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        self.scheduler.add_request(
            req.native_id, req.prompt_ids, max_tokens=max_tokens,
            min_tokens=min(p.min_tokens, max_tokens), eos_token_ids=list(self.eos_token_ids),
            stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        )  # fmt: skip
        self._by_native[req.native_id] = req

    def abort(self, request_id: str) -> bool:
        """Drop a request (queued or running, every choice); False if it is unknown or done."""
        choices = self._requests.pop(request_id, None)
        if choices is None:
            return False
        for req in choices:
            if self._by_native.pop(req.native_id, None) is not None:
                self.scheduler.abort(req.native_id)
        return True

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        return bool(self._requests)

    @property
    def num_unfinished(self) -> int:
        """Queued plus running requests."""
        return len(self._requests)

    # ---- one step ---------------------------------------------------------------------------
    def _metadata(self, num_tokens: int, num_seqs: int) -> AttentionMetadata:
        b = self.builder
        dev = self.device
        qsl = b.query_start_loc[: num_seqs + 1]
        lens = b.seq_lens[:num_seqs]
        used_blocks = -(-int(lens.max()) // self.block_size)
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(b.slot_mapping[:num_tokens]).to(dev),
            block_tables=torch.from_numpy(b.block_tables[:num_seqs, :used_blocks]).to(dev),
            seq_lens=torch.from_numpy(lens).to(dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            max_query_len=int(np.diff(qsl).max()),
            max_seq_len=int(lens.max()),
            decode_only=num_tokens == num_seqs,
        )

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the choices that produced tokens or finished."""
        sched = self.scheduler.schedule()
        if sched.num_reqs == 0:
            return []
        if sched.blocks_to_copy:
            self._copy_blocks(sched.blocks_to_copy)
        num_tokens = self.builder.build(self.scheduler)
        num_seqs = sched.num_reqs
        hidden = self._replay_decode(num_tokens, num_seqs) if self.graphs is not None else None
        if hidden is None:
            meta = self._metadata(num_tokens, num_seqs)
            ids = torch.from_numpy(self.builder.input_ids[:num_tokens]).to(self.device)
            pos = torch.from_numpy(self.builder.positions[:num_tokens]).to(self.device)
            hidden = self.model(ids, pos, self.kv_caches, meta)
        reqs = [self._by_native[rid] for rid in sched.req_ids.tolist()]
        # NOTE: a row whose prompt is still incomplete after this chunk samples nothing (the
        # scheduler ignores its token), so it gets no logits.
        done = (sched.num_computed_tokens + sched.num_scheduled_tokens).tolist()
        rows = [i for i, r in enumerate(reqs) if done[i] >= len(r.prompt_ids) + len(r.output_ids)]
        forked = self._fork_children(reqs, rows)  # (row of the parent, child)
        rows_to_sample = rows + [i for i, _ in forked]
        sampled_reqs = [reqs[i] for i in rows] + [child for _, child in forked]
        tokens = [0] * (num_seqs + len(forked))
        logprobs: dict[int, TokenLogprob] = {}
        if rows_to_sample:
            # each sequence's last token row, from the builder's host copy (no device read)
            last = self.builder.query_start_loc[1 : num_seqs + 1].astype(np.int64) - 1
            picked = torch.from_numpy(last[rows_to_sample]).to(self.device)
            logits = self.model.compute_logits(hidden[picked])  # [rows, vocab]
            drawn, lps = self._sample(logits, sampled_reqs)
            for slot, token in zip(rows + list(range(num_seqs, len(tokens))), drawn.tolist(),
                                   strict=True):  # fmt: skip
                tokens[slot] = token
            logprobs = {
                r.native_id: lp for r, lp in zip(sampled_reqs, lps, strict=True) if lp is not None
            }
        update = self.scheduler.update(tokens)
        return self._collect(update, logprobs)

    def _replay_decode(self, num_tokens: int, num_seqs: int) -> torch.Tensor | None:
        """The step's hidden states from a CUDA graph, or None (not decode-only, no bucket)."""
        assert self.graphs is not None
        if num_tokens != num_seqs:
            return None
        b = self.builder
        used_blocks = -(-int(b.seq_lens[:num_seqs].max()) // self.block_size)
        return self.graphs.run(
            b.input_ids[:num_tokens], b.positions[:num_tokens], b.slot_mapping[:num_tokens],
            b.block_tables[:num_seqs, :used_blocks], b.seq_lens[:num_seqs],
        )  # fmt: skip

    def _fork_children(self, reqs: list[_Request], rows: list[int]) -> list[tuple[int, _Request]]:
        """Fork the waiting choices of every request whose prompt completes in this step.

        A forked child shares the parent's KV blocks (copy-on-write) and joins this step: it
        samples its first token from the parent's logits with its own seed. When the scheduler
        has no room for another running sequence, the child is queued as a request of its own
        instead (its prompt then comes from the prefix cache where the blocks are cached).
        """
        forked: list[tuple[int, _Request]] = []
        for i in rows:
            parent = reqs[i]
            for child in parent.children:
                if self.scheduler.fork(parent.native_id, child.native_id):
                    self._by_native[child.native_id] = child
                    forked.append((i, child))
                else:
                    self._schedule_choice(child)
            parent.children = []
        return forked

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: give a sequence its private copy of a shared KV block, every layer."""
        src = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
            value_cache.index_copy_(0, dst, value_cache.index_select(0, src))

    def _sample(
        self, logits: torch.Tensor, reqs: list[_Request]
    ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        rows = [RowState(r.params, r.prompt_ids, r.output_ids, self.eos_token_ids) for r in reqs]
        adjusted = process_logits(logits, rows)
        dev = adjusted.device
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
        seeds = torch.tensor([token_seed(r.seed, len(r.output_ids)) for r in reqs],
                             dtype=torch.int64, device=dev)  # fmt: skip
        sampled = [r for r in reqs if not r.params.greedy]
        top_k = top_p = min_p = None
        if any(r.params.top_k for r in sampled):
            top_k = torch.tensor([r.params.top_k for r in reqs], dtype=torch.int32, device=dev)
        if any(r.params.top_p < 1.0 for r in sampled):
            top_p = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev)
        if any(r.params.min_p > 0.0 for r in sampled):
            min_p = torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32, device=dev)
        # NOTE: the torch path draws by inverting the CDF (one random number per row) rather
        # than the kernel's per-token Gumbel noise: same distribution, far less CPU work.
        sampler = K.sample if K.backend_for(adjusted) == "triton" else sample_inverse_cdf
        tokens = sampler(adjusted, temps, seeds, top_k=top_k, top_p=top_p, min_p=min_p)
        out: list[TokenLogprob | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs]
        if want:
            k = max(reqs[i].params.top_logprobs for i in want)
            chosen, top_ids, top_lp = top_logprobs(adjusted[want], tokens[want], k)
            for j, i in enumerate(want):
                n = reqs[i].params.top_logprobs
                top = list(zip(top_ids[j, :n].tolist(), top_lp[j, :n].tolist(), strict=True))
                out[i] = TokenLogprob(int(tokens[i]), float(chosen[j]), top)
        return tokens.cpu(), out

    def _collect(
        self, update: _native.UpdateOutput, logprobs: dict[int, TokenLogprob]
    ) -> list[RequestOutput]:
        finished = dict(update.finished)
        outputs: list[RequestOutput] = []
        # NOTE: tolist() gives Python ints (iterating the native arrays gives numpy scalars).
        req_ids, token_ids = update.req_ids.tolist(), update.token_ids.tolist()
        for native_id, token in zip(req_ids, token_ids, strict=True):
            req = self._by_native.get(native_id)
            if req is None:  # aborted while its step ran
                continue
            req.output_ids.append(token)
            text = req.detok.add_token(token)
            reason = finished.get(native_id)
            if reason is None and req.detok.stopped_by is not None:
                self.scheduler.abort(native_id)  # a stop string: the scheduler cannot see it
                reason = "stop"
            all_done = False
            if reason is not None:
                text += req.detok.flush()
                req.done = True
                del self._by_native[native_id]
                choices = self._requests[req.request_id]
                all_done = all(c.done for c in choices)
                if all_done:
                    del self._requests[req.request_id]
            lp = logprobs.get(native_id)
            outputs.append(RequestOutput(
                request_id=req.request_id, new_token_ids=[token], new_text=text,
                finished=reason is not None, finish_reason=reason,
                num_prompt_tokens=len(req.prompt_ids), num_output_tokens=len(req.output_ids),
                logprobs=[lp] if lp is not None else [], index=req.index,
                request_finished=all_done,
            ))  # fmt: skip
        return outputs
