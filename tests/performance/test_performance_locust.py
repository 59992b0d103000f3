"""The platform under load: `helixflow serve` (real SmolLM2 and MiniLM on the CPU) and locust
users (bench/locustfile.py) streaming chat completions and requesting embeddings over HTTPS with
real API keys, for a bounded run. Every request must succeed, both kinds must flow, and the
time to first token and inter-token latency must be in locust's statistics.

NOTE: locust runs in its own process (bench_load.run_locust): it monkey-patches the standard
library with gevent as it is imported, which must never happen inside pytest.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench_load import Platform, read_failures, read_stats, run_locust

USERS, SPAWN_RATE, RUN_TIME = 50, 25, 20


@pytest.fixture(scope="module")
def serve(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    env = {**os.environ, "HELIXFLOW_HOME": str(model_home)}
    platform = Platform(tmp_path_factory.mktemp("load") / "data", ["--max-model-len", "1024"],
                        env)  # fmt: skip
    platform.start()
    try:
        yield platform
    finally:
        assert platform.stop() == 0, platform.log.read_text()[-3000:]


def test_locust_load_has_no_failures(serve: Platform, tmp_path: Path) -> None:
    assert importlib.util.find_spec("locust"), "locust is not installed (the `test` extra)"
    keys = [serve.key, serve.new_key()]
    done = run_locust(serve.url, keys, serve.ca, tmp_path / "load", users=USERS,
                      spawn_rate=SPAWN_RATE, run_time=RUN_TIME)  # fmt: skip
    print(done.stderr[-3000:])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert read_failures(tmp_path / "load") == []
    stats = read_stats(tmp_path / "load")
    assert all(row["Failure Count"] == "0" for row in stats.values()), stats
    count = {key: int(row["Request Count"]) for key, row in stats.items()}
    chats, embeddings = count[("POST", "/v1/chat/completions")], count[("POST", "/v1/embeddings")]
    # NOTE: the floors only prove that both kinds flowed: on 2 shared cores a 20 s run answers
    # ~100 chats and ~40 embeddings requests.
    assert chats >= 10 and embeddings >= 5, count
    # Every answered chat had a first token; its later tokens are ITL samples.
    assert count[("TTFT", "chat")] >= chats and count[("ITL", "chat")] > chats, count
    ttft, itl = stats[("TTFT", "chat")], stats[("ITL", "chat")]
    assert 0 < float(ttft["50%"]) <= float(ttft["99%"]) and float(itl["50%"]) > 0, (ttft, itl)
    assert serve.restarts() == 0


def test_refusals_are_failures_with_their_message_and_429s_apart_when_expected(
    serve: Platform, tmp_path: Path
) -> None:
    # User 0 has a key the gateway does not know; user 1 a key whose TPM limit (1) no chat fits.
    keys = ["hfx_not_a_key", serve.new_key("--tpm", "1")]
    done = run_locust(serve.url, keys, serve.ca, tmp_path / "refused", users=2, spawn_rate=2,
                      run_time=4, wait="0.1,0.2", env={"HELIXFLOW_EXPECT_429": "1"})  # fmt: skip
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]  # locust: failures seen
    failures = read_failures(tmp_path / "refused")
    assert failures and all(f["Error"].startswith("ApiFailure('HTTP 401: ") for f in failures), (
        failures
    )
    stats = read_stats(tmp_path / "refused")
    limited = sum(int(row["Request Count"]) for (kind, _), row in stats.items() if kind == "429")
    assert limited > 0, stats
