"""Scheduler step cost: native (C++) vs the pure-Python reference, side by side in one run.

Method: for each number of requests N and each mix, build the same Scheduler + BatchBuilder
in both implementations, warm them into steady state, then time complete engine steps
(``schedule()`` + ``BatchBuilder.build()`` + ``update(sampled)``) with ``perf_counter_ns``;
the model itself is not run (sampled tokens are pre-drawn random ids). Reported: median µs
per step for each implementation and their ratio.

Mixes:
- decode: N running requests, every one decoding (one token each per step), contexts of
  256-768 tokens, 16-token blocks, budget N + 8192.
- prefill: N requests in the system with 128-1024-token prompts and 8 output tokens; a
  finished request is replaced at once (outside the timed region), so steps are mostly
  prefill chunks under an 8192-token budget, plus decodes.

Targets (issue 2): >= 20x the reference at N=1024 and < 50 µs per step at N=256.

    python bench/bench_scheduler.py               # full table
    python bench/bench_scheduler.py --sizes 64 256 --steps 50
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import numpy as np

from helixflow import _native
from helixflow.pool import reference

BLOCK_SIZE = 16
VOCAB = 32000


def _prompt(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]


class Workload:
    """One scheduler under one mix, driven step by step."""

    def __init__(self, core: ModuleType, mix: str, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.mix = mix
        self.n = n
        self.next_id = 0
        if mix == "decode":
            # NOTE: a budget well above n, so warm-up prefills are not starved by decodes.
            budget, max_len = n + 8192, 4096
            num_blocks = n * (1024 + 256) // BLOCK_SIZE + 64
        else:
            budget, max_len = 8192, 2048
            num_blocks = n * 1100 // BLOCK_SIZE + 64
        self.sched: Any = core.Scheduler(
            num_blocks, BLOCK_SIZE, max_num_batched_tokens=budget, max_num_seqs=n,
            max_model_len=max_len,
        )  # fmt: skip
        self.builder: Any = core.BatchBuilder.for_scheduler(self.sched)
        self.samples = np.random.default_rng(seed).integers(1, VOCAB, size=(64, 2 * n))
        self.sample_index = 0
        for _ in range(n):
            self._add()

    def _add(self) -> None:
        if self.mix == "decode":
            self.sched.add_request(self.next_id, _prompt(self.rng, 256, 768), max_tokens=10**6)
        else:
            self.sched.add_request(self.next_id, _prompt(self.rng, 128, 1024), max_tokens=8)
        self.next_id += 1

    def step(self) -> tuple[int, int]:
        """One engine step; returns (ns spent in the core, tokens scheduled)."""
        sampled_pool = self.samples[self.sample_index % len(self.samples)]
        self.sample_index += 1
        t0 = time.perf_counter_ns()
        out = self.sched.schedule()
        self.builder.build(self.sched)
        upd = self.sched.update(sampled_pool[: out.num_reqs])
        elapsed = time.perf_counter_ns() - t0
        for _ in upd.finished:
            self._add()
        return elapsed, out.total_num_scheduled_tokens

    def warm_up(self) -> None:
        if self.mix == "decode":  # until every request decodes: one token each per step
            while self.step()[1] != self.n or self.sched.num_waiting:
                pass
        else:  # into a steady state of arrivals and completions
            for _ in range(max(20, self.n // 64)):
                self.step()


def measure(core: ModuleType, mix: str, n: int, steps: int, seed: int) -> tuple[float, float]:
    w = Workload(core, mix, n, seed)
    w.warm_up()
    times, tokens = [], []
    for _ in range(steps):
        ns, tok = w.step()
        times.append(ns / 1000)
        tokens.append(tok)
    return statistics.median(times), statistics.mean(tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--mixes", nargs="+", default=["decode", "prefill"],
                   choices=["decode", "prefill"])  # fmt: skip
    p.add_argument("--steps", type=int, default=200, help="timed native steps per case")
    p.add_argument("--ref-steps", type=int, default=30, help="timed reference steps per case")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    print(f"# bench_scheduler: {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, native {_native.__build_info__}")  # fmt: skip
    print("# median µs per step of schedule() + BatchBuilder.build() + update(); "
          f"{args.steps} native / {args.ref_steps} reference timed steps after warm-up\n")
    print("| mix | requests | tokens/step | native µs/step | reference µs/step | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for mix in args.mixes:
        for n in args.sizes:
            nat, tok = measure(_native, mix, n, args.steps, args.seed)
            ref, _ = measure(reference, mix, n, args.ref_steps, args.seed)
            print(f"| {mix} | {n} | {tok:.0f} | {nat:.1f} | {ref:.0f} | {ref / nat:.1f}x |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
