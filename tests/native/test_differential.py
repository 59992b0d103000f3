"""Differential tests: the native core against the pure-Python reference.

Seeded random sequences of add / schedule / build / fork / update / abort (and misuse) run on
both implementations side by side; the whole observable state is compared after every
operation. A failure names its seed and operation index: rerun one case with
``pytest tests/native/test_differential.py -k <seed>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from helixflow import _native
from helixflow.pool import reference

VOCAB = 50
EOS = 0


@dataclass(frozen=True)
class Config:
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_prefix_caching: bool


CONFIGS = {
    "tight": Config(24, 4, 16, 6, 64, True),  # preemption-heavy
    "chunky": Config(96, 8, 24, 12, 160, True),  # long prompts, chunked prefill
    "nocache": Config(40, 4, 32, 8, 64, False),
    "roomy": Config(256, 16, 256, 32, 256, True),
}
SEEDS = range(6)
NUM_OPS = 3000


def _scheduler_state(s: Any) -> dict[str, Any]:
    ids = s.running_ids() + s.waiting_ids()
    return {
        "running": s.running_ids(),
        "waiting": s.waiting_ids(),
        "requests": {i: s.request_info(i) for i in ids},
        "tables": {i: s.allocator.block_table(i) for i in s.running_ids()},
        "stats": s.stats(),
        "alloc": s.allocator.stats(),
        "free": s.allocator.free_block_ids(),
    }


def _builder_state(b: Any, block_size: int) -> dict[str, Any]:
    n, r = b.num_tokens, b.num_seqs
    lens = b.seq_lens[:r].tolist()
    bs = b.block_tables
    return {
        "n": n,
        "r": r,
        "ids": b.input_ids[:n].tolist(),
        "pos": b.positions[:n].tolist(),
        "slots": b.slot_mapping[:n].tolist(),
        "lens": lens,
        "qsl": b.query_start_loc[: r + 1].tolist(),
        "tables": [bs[i, : -(-lens[i] // block_size)].tolist() for i in range(r)],
    }


def _sched_out(o: Any) -> tuple[Any, ...]:
    return (
        o.req_ids.tolist(), o.num_scheduled_tokens.tolist(), o.num_computed_tokens.tolist(),
        o.total_num_scheduled_tokens, list(o.preempted_ids), list(o.blocks_to_copy),
    )  # fmt: skip


def _upd_out(o: Any) -> tuple[Any, ...]:
    return (o.req_ids.tolist(), o.token_ids.tolist(), list(o.finished))


def _both(label: str, pair: tuple[Any, Any], method: str, *args: Any,
          convert: Any = None, **kwargs: Any) -> tuple[str, Any]:
    """Call ``method`` on both implementations: both must succeed with equal results, or both
    raise the same exception type."""
    results = []
    for obj in pair:
        fn = obj
        for name in method.split("."):
            fn = getattr(fn, name)
        try:
            value = fn(*args, **kwargs)
            results.append(("ok", convert(value) if convert else value))
        except (ValueError, RuntimeError, IndexError) as e:
            results.append(("err", type(e).__name__))
    assert results[0] == results[1], f"{label}: native {results[0]} != reference {results[1]}"
    return results[0]


def _run_case(config: Config, seed: int) -> None:
    rng = random.Random(seed)
    kw = dict(
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    sn = _native.Scheduler(config.num_blocks, config.block_size, **kw)
    sr = reference.Scheduler(config.num_blocks, config.block_size, **kw)
    bn = _native.BatchBuilder.for_scheduler(sn)
    br = reference.BatchBuilder.for_scheduler(sr)
    sched = (sn, sr)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 40))] for _ in range(4)]
    next_id = 0
    in_step = False
    step_members: list[int] = []  # rows of the open step, then children forked into it

    for op_index in range(NUM_OPS):
        label = f"seed={seed} op={op_index}"
        r = rng.random()
        # not in a step: 30% add, 60% schedule+build, 5% abort, 5% fork/misuse;
        # in a step: 85% update, 5% abort, 7% fork, 3% misuse.
        if not in_step:
            op = "add" if r < 0.3 else "schedule" if r < 0.9 else "abort" if r < 0.95 else (
                "fork" if r < 0.98 else "misuse")
        else:
            op = "update" if r < 0.85 else "abort" if r < 0.9 else (
                "fork" if r < 0.97 else "misuse")
        if op == "add":
            # add: shared prefixes exercise the prefix cache; a few are invalid on purpose
            prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
            prompt += [rng.randrange(1, VOCAB) for _ in range(rng.randint(0 if prompt else 1, 30))]
            max_tokens = rng.choice([1, 2, 5, 16, 40, 400])
            params = dict(
                max_tokens=max_tokens,
                min_tokens=rng.choice([0, 0, 1, min(3, max_tokens)]),
                eos_token_ids=[EOS],
                stop_token_ids=rng.choice([[], [7], [7, 8]]),
                ignore_eos=rng.random() < 0.1,
                priority=rng.choice([0, 0, 0, 1, -1]),
            )
            if rng.random() < 0.03:
                prompt = rng.choice([[], [-1], prompt * 20])
            rid = next_id if rng.random() > 0.02 else max(0, next_id - 1)  # dup ids sometimes
            next_id += 1
            _both(f"{label} add", sched, "add_request", rid, prompt, **params)
        elif op == "schedule":
            out = _both(f"{label} schedule", sched, "schedule", convert=_sched_out)
            assert out[0] == "ok", label
            in_step = True
            step_members = list(out[1][0])
            assert bn.build(sn) == br.build(sr) == out[1][3], label
            bs = config.block_size
            assert _builder_state(bn, bs) == _builder_state(br, bs), label
        elif op == "update":
            sampled = [EOS if rng.random() < 0.05 else rng.randrange(1, VOCAB)
                       for _ in range(len(step_members))]  # fmt: skip
            if rng.random() < 0.02:
                sampled.append(1)  # wrong length: both must refuse
                _both(f"{label} bad update", sched, "update", sampled)
                continue
            _both(f"{label} update", sched, "update", np.array(sampled), convert=_upd_out)
            in_step = False
        elif op == "abort":
            candidates = sn.running_ids() + sn.waiting_ids()
            rid = rng.choice(candidates) if candidates and rng.random() < 0.95 else 10**9
            _both(f"{label} abort", sched, "abort", rid)
        elif op == "fork":
            parents = sn.running_ids() + sn.waiting_ids()[:1]  # a waiting parent is refused
            if not parents:
                continue
            parent, child = rng.choice(parents), next_id
            next_id += 1
            res = _both(f"{label} fork", sched, "fork", parent, child)
            if in_step and res == ("ok", True) and parent in step_members:
                step_members.append(child)
        else:
            # misuse that must be refused identically
            bad = rng.choice(["schedule", "update", "info", "table"])
            if bad == "schedule" and in_step:
                _both(f"{label} schedule twice", sched, "schedule")
            elif bad == "update" and not in_step:
                _both(f"{label} update no step", sched, "update", [])
            elif bad == "info":
                _both(f"{label} info", sched, "request_info", -5)
            else:
                _both(f"{label} table", sched, "allocator.block_table", -5)
        assert _scheduler_state(sn) == _scheduler_state(sr), label


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_matches_reference(name: str, seed: int) -> None:
    _run_case(CONFIGS[name], seed)


def _allocator_state(a: Any, seq_ids: list[int]) -> dict[str, Any]:
    return {
        "stats": a.stats(),
        "free": a.free_block_ids(),
        "tables": {i: a.block_table(i) for i in seq_ids if a.has_seq(i)},
        "refs": [a.ref_count(b) for b in range(a.num_blocks)],
        "hashes": [a.cached_block_hash(b) for b in range(a.num_blocks)],
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_allocator_native_matches_reference(seed: int) -> None:
    """The allocator's own API, driven directly with random (sometimes invalid) arguments."""
    rng = random.Random(1000 + seed)
    block_size = rng.choice([1, 2, 4, 16])
    an = _native.BlockAllocator(48, block_size)
    ar = reference.BlockAllocator(48, block_size)
    alloc = (an, ar)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(3)]
    tokens: dict[int, list[int]] = {}  # seq id -> its token ids
    computed: dict[int, int] = {}
    next_id = 0
    for op_index in range(NUM_OPS):
        label = f"seed={seed} op={op_index}"
        live = sorted(tokens)
        r = rng.random()
        if r < 0.3 or not live:
            sid, next_id = next_id, next_id + 1
            toks = rng.choice(prefixes)[: rng.randint(1, 60)]
            toks += [rng.randrange(VOCAB)] * rng.randint(0, 8)
            n = rng.randint(0, len(toks) + 1)  # 0 and len+1 are invalid
            res = _both(f"{label} allocate", alloc, "allocate", sid, toks, n)
            if res[0] == "ok" and res[1] is not None:
                tokens[sid], computed[sid] = toks, res[1]
        elif r < 0.55:
            sid = rng.choice(live)
            toks = tokens[sid]
            grow = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 2 * block_size))]
            total = toks + grow
            c = computed[sid]
            end = rng.randint(c, len(total)) if rng.random() < 0.95 else c  # end == c invalid
            res = _both(f"{label} append_slots", alloc, "append_slots", sid, c, end)
            if res[0] == "ok" and res[1] is not None:
                tokens[sid] = total
                computed[sid] = end
                _both(f"{label} cache_blocks", alloc, "cache_blocks", sid, total, end)
        elif r < 0.65:
            parent, child = rng.choice(live), next_id
            next_id += 1
            _both(f"{label} fork", alloc, "fork", parent, child)
            tokens[child], computed[child] = list(tokens[parent]), computed[parent]
        elif r < 0.9:
            sid = rng.choice(live) if rng.random() < 0.95 else next_id + 7  # unknown: refused
            _both(f"{label} free", alloc, "free", sid)
            tokens.pop(sid, None)
        else:
            toks = rng.choice(prefixes)
            _both(f"{label} lookup", alloc, "num_cached_prefix_tokens", toks)
        assert _allocator_state(an, live) == _allocator_state(ar, live), label
