"""Load test of the whole platform: `helixflow serve` (the real SmolLM2-135M-Instruct and
all-MiniLM-L6-v2 on this machine) under locust users streaming chat completions and requesting
embeddings over HTTPS with real API keys (bench/locustfile.py).

Method:
- platform: `helixflow serve` in a fresh data directory on free ports (monitoring, auth on
  SQLite, one pool, one gateway worker over TLS), its printed API key plus `--keys - 1` more
  made with `helixflow admin create-key` (no rate limits); one chat and one embeddings request
  warm it up before anything is measured;
- baseline: the same request mix from 1 user with no think time for `--baseline-time` s: what
  one request costs on an otherwise idle platform, so that the load run's TTFT and ITL read as
  the price of sharing the pool with `--users` others, and its tokens/s as what batching buys;
- load: `--users` users (spawned at `--spawn-rate`/s, ramp-up included in the figures), each
  waiting 0.5-1.5 s between requests, chat : embeddings = 3 : 1, max_tokens 16-32, for
  `--run-time` s; locust runs headless in its own process and writes CSV statistics;
- figures: requests/s (chat + embeddings answered, over the run time), completion tokens/s (the
  gateway's `helixflow_gateway_tokens_total` before and after), TTFT (request sent -> first
  content event) and ITL (gap between content events) percentiles from the client side,
  embeddings latency, failures (HTTP errors, SSE error events, broken streams); and the resident
  memory (VmRSS of each service's process tree, from /proc) after the warm-up, its peak sampled
  every 0.5 s during the load run, and after it.

    python bench/bench_load.py                                # 200 users, 60 s (the issue's run)
    python bench/bench_load.py --users 10 --run-time 10 --baseline-time 5   # smoke
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
CHAT, EMBED = "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"
SERVICES = ("gateway", "pool", "auth", "monitor")

# -- the platform ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    """A `helixflow serve` process on free ports, with its first API key."""

    data: Path
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 300) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("gateway", "pool", "auth", "auth_http",
                                                     "monitor", "monitor_http")}  # fmt: skip
        env = {k: v for k, v in (self.env or os.environ).items() if k not in ("PORT", "REDIS_URL")}
        args = [sys.executable, "-m", "helixflow", "serve", "--data-dir", str(self.data),
                "--port", str(self.ports["gateway"]), "--pool-port", str(self.ports["pool"]),
                "--auth-port", str(self.ports["auth"]),
                "--auth-http-port", str(self.ports["auth_http"]),
                "--monitor-port", str(self.ports["monitor"]),
                "--monitor-http-port", str(self.ports["monitor_http"]), *self.extra]  # fmt: skip
        self.log = self.data.parent / f"{self.data.name}-serve.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "HelixFlow is up" not in (text := self.log.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"helixflow serve did not come up:\n{text[-3000:]}")
            time.sleep(0.2)
        found = re.search(r"API key:\s+(hfx_\S+)", text)
        if found is None:
            raise RuntimeError(f"no API key printed:\n{text[-3000:]}")
        self.key = found.group(1)
        self.env_used = env

    @property
    def url(self) -> str:
        return f"https://localhost:{self.ports['gateway']}"

    @property
    def ca(self) -> Path:
        return self.data / "certs" / "ca.pem"

    def pids(self) -> dict[str, int]:
        state = json.loads((self.data / "state.json").read_text())
        return {name: int(state[name]["pid"]) for name in SERVICES if state[name]["pid"]}

    def restarts(self) -> int:
        state = json.loads((self.data / "state.json").read_text())
        return sum(int(s["restarts"]) for s in state.values())

    def new_key(self, *args: str) -> str:
        """Another API key of the admin (`args`: --rpm, --tpm, --scope ...)."""
        done = subprocess.run([sys.executable, "-m", "helixflow", "admin", "--database-path",
                               str(self.data / "auth.db"), "create-key", "admin", *args,
                               "--json"],
                              env=self.env_used, capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
        return str(json.loads(done.stdout)["key"])

    def get(self, path: str, body: dict[str, object] | None = None) -> bytes:
        """A GET (or a JSON POST) on the gateway with the first key."""
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        tls = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(request, context=tls, timeout=120) as reply:
            return bytes(reply.read())

    def warm_up(self) -> None:
        self.get(
            "/v1/chat/completions",
            {"model": CHAT, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        )
        self.get("/v1/embeddings", {"model": EMBED, "input": "warm up"})

    def completion_tokens(self) -> float:
        """The gateway's count of completion tokens served so far."""
        text = self.get("/metrics").decode()
        return sum(
            float(m)
            for m in re.findall(
                r'^helixflow_gateway_tokens_total\{[^}]*kind="completion"[^}]*\} (\S+)', text, re.M
            )
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


# -- memory ----------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def rss_mib(pid: int, tree: dict[int, list[int]] | None = None) -> float:
    """VmRSS of `pid` and its descendants (granian's worker, the pool's helpers), in MiB."""
    tree = _children() if tree is None else tree
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(tree.get(current, ()))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(found.group(1)) if found else 0
    return total / 1024


def memory(pids: dict[str, int]) -> dict[str, float]:
    tree = _children()
    return {name: rss_mib(pid, tree) for name, pid in pids.items()}


class PeakMemory(threading.Thread):
    """Samples each service's RSS every `interval` s until `stop()`; `peak` per service."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak = dict.fromkeys(pids, 0.0)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            for name, mib in memory(self.pids).items():
                self.peak[name] = max(self.peak[name], mib)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return self.peak


# -- locust ----------------------------------------------------------------------------------


def run_locust(url: str, keys: list[str], ca: Path, csv_prefix: Path, *, users: int,
               spawn_rate: float, run_time: float, wait: str = "0.5,1.5",
               env: dict[str, str] | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Locust headless on bench/locustfile.py in its own process (gevent patches everything it
    imports, so never in this one); its CSV files are `csv_prefix`_stats.csv etc. `env` adds
    to the locustfile's settings (e.g. HELIXFLOW_EXPECT_429)."""
    env = {**os.environ, "HELIXFLOW_API_KEY": ",".join(keys), "HELIXFLOW_CA": str(ca),
           "HELIXFLOW_WAIT": wait, **(env or {})}  # fmt: skip
    args = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", url, "-u", str(users), "-r", str(spawn_rate), "-t", f"{run_time:g}s",
            "--csv", str(csv_prefix), "--only-summary", "--stop-timeout", "0"]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True,
                          timeout=timeout or run_time + 60)  # fmt: skip


Row = dict[str, str]


def read_stats(csv_prefix: Path) -> dict[tuple[str, str], Row]:
    """locust's `_stats.csv` by (Type, Name): ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"), ("TTFT", "chat"), ("ITL", "chat"), ("", "Aggregated")."""
    with open(f"{csv_prefix}_stats.csv", newline="") as file:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}


def read_failures(csv_prefix: Path) -> list[Row]:
    """locust's `_failures.csv`: Method, Name, Error, Occurrences."""
    with open(f"{csv_prefix}_failures.csv", newline="") as file:
        return list(csv.DictReader(file))


def _figure(stats: dict[tuple[str, str], Row], key: tuple[str, str], column: str,
            missing: float = float("nan")) -> float:  # fmt: skip
    """A number of locust's CSV (`missing` for a row it has not, NaN for its "N/A")."""
    row = stats.get(key)
    if row is None:
        return missing
    return float(row[column]) if row[column] not in ("N/A", "") else float("nan")


def summarize(stats: dict[tuple[str, str], Row], seconds: float,
              tokens: float) -> dict[str, float]:  # fmt: skip
    chat, emb = ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")
    count = {name: _figure(stats, key, "Request Count", 0.0) for name, key in
             (("chat", chat), ("emb", emb))}  # fmt: skip
    failures = sum(_figure(stats, key, "Failure Count", 0.0) for key in (chat, emb))
    out = {**count, "failures": failures, "tok_s": tokens / seconds}
    out["rps"] = (out["chat"] + out["emb"]) / seconds
    for name, key in (("ttft", ("TTFT", "chat")), ("itl", ("ITL", "chat")), ("emb", emb)):
        for p in ("50%", "95%", "99%"):
            out[f"{name}_p{p[:-1]}"] = _figure(stats, key, p)
    return out


# -- the benchmark ---------------------------------------------------------------------------


def measure(serve: Platform, keys: list[str], work: Path, name: str, *, users: int,
            spawn_rate: float, run_time: float, wait: str) -> dict[str, float]:  # fmt: skip
    before = serve.completion_tokens()
    done = run_locust(serve.url, keys, serve.ca, work / name, users=users,
                      spawn_rate=spawn_rate, run_time=run_time, wait=wait)  # fmt: skip
    (work / f"{name}-locust.log").write_text(done.stdout + done.stderr)
    if not (work / f"{name}_stats.csv").exists():
        raise RuntimeError(f"locust failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    figures = summarize(read_stats(work / name), run_time, serve.completion_tokens() - before)
    for failure in read_failures(work / name):
        print(f"  {name} failure x{failure['Occurrences']}: {failure['Method']} "
              f"{failure['Name']}: {failure['Error']}")  # fmt: skip
    return figures


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}" if b > 0 else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--spawn-rate", type=float, default=50.0, help="users started per s")
    parser.add_argument("--run-time", type=float, default=60.0, help="seconds of the load run")
    parser.add_argument("--baseline-time", type=float, default=30.0, help="seconds at 1 user")
    parser.add_argument("--keys", type=int, default=4, help="API keys the users share")
    parser.add_argument("--max-model-len", type=int, help="passed to helixflow serve")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    extra = ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    serve = Platform(work / "data", extra)
    started = time.monotonic()
    serve.start()
    try:
        print(f"# bench_load {datetime.date.today()}: {platform.processor() or 'cpu'}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}; platform up in "
              f"{time.monotonic() - started:.1f} s; files in {work}")  # fmt: skip
        print(f"# load: {args.users} users (spawned {args.spawn_rate:g}/s), 0.5-1.5 s think "
              f"time, chat : embeddings = 3 : 1, max_tokens 16-32, {args.run_time:g} s, "
              f"{args.keys} keys; baseline: 1 user, no think time, {args.baseline_time:g} s",
              flush=True)  # fmt: skip
        keys = [serve.key, *(serve.new_key() for _ in range(args.keys - 1))]
        serve.warm_up()
        pids = serve.pids()
        idle = memory(pids)
        base = measure(serve, keys[:1], work, "baseline", users=1, spawn_rate=1,
                       run_time=args.baseline_time, wait="0,0")  # fmt: skip
        sampler = PeakMemory(pids)
        sampler.start()
        load = measure(serve, keys, work, "load", users=args.users, spawn_rate=args.spawn_rate,
                       run_time=args.run_time, wait="0.5,1.5")  # fmt: skip
        peak = sampler.stop()
        after = memory(pids)
        restarts = serve.restarts()
    finally:
        code = serve.stop()

    print(
        "\n| run | users | s | req/s | chat | emb | failures | completion tok/s "
        "| TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | emb p50/p95 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, users, seconds, f in (("baseline", 1, args.baseline_time, base),
                                    ("load", args.users, args.run_time, load)):  # fmt: skip
        print(f"| {name} | {users} | {seconds:g} | {f['rps']:.2f} | {f['chat']:.0f} | "
              f"{f['emb']:.0f} | {f['failures']:.0f} | {f['tok_s']:.1f} | "
              f"{f['ttft_p50']:.0f} / {f['ttft_p95']:.0f} / {f['ttft_p99']:.0f} | "
              f"{f['itl_p50']:.0f} / {f['itl_p95']:.0f} / {f['itl_p99']:.0f} | "
              f"{f['emb_p50']:.0f} / {f['emb_p95']:.0f} |")  # fmt: skip
    print("\n| service | RSS idle MiB | peak under load MiB | after load MiB |")
    print("|---|---:|---:|---:|")
    for name in pids:
        print(f"| {name} | {idle[name]:.0f} | {peak[name]:.0f} | {after[name]:.0f} |")
    ratios = ", ".join(
        f"{label} x{_ratio(load[k], base[k])}"
        for label, k in (
            ("TTFT p50", "ttft_p50"),
            ("ITL p50", "itl_p50"),
            ("completion tokens/s", "tok_s"),
        )
    )
    print(f"\nload vs baseline: {ratios}; service restarts: {restarts}; "
          f"serve exit code {code}")  # fmt: skip
    return 0 if load["failures"] == 0 and base["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
