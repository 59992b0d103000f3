"""``helixflow pool`` as a real process on a free port, driven over real gRPC.

Streaming generation with the real SmolLM2, 32 concurrent streams equal to each run alone,
cancellation freeing the KV cache, admission control, errors with the right status codes,
health, and a SIGTERM drain that lets in-flight streams finish.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from helixflow._proto import inference_pb2 as pb  # noqa: E402
from helixflow._proto import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "Name a large ocean.",
    "What color is the sky?", "Say hello in Spanish.",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pool:
    """A ``helixflow pool`` process and a channel to it."""

    def __init__(
        self, home: Path, log_dir: Path, *args: str, secure: dict[str, Path] | None = None
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        env = {**os.environ, "HELIXFLOW_HOME": str(home), "PORT": str(self.port)}
        self.log = log_dir / f"pool-{self.port}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "helixflow", "pool", "--max-model-len", "1024",
             "--num-blocks", "512", "--metrics-port", str(self.metrics_port), *args],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if secure is None:
            self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=secure["ca"].read_bytes(),
                private_key=secure["client_key"].read_bytes(),
                certificate_chain=secure["client"].read_bytes(),
            )
            self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self.stub = pb_grpc.InferencePoolStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"the pool exited early:\n{self.log.read_text()}")
            try:
                self.stub.ListModels(pb.ListModelsRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def status(self) -> int:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(reply.status)

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture(scope="module")
def pool(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = Pool(model_home, tmp_path_factory.mktemp("pool"))
    yield p
    p.close()


def chat_request(question: str, max_tokens: int = 16, **params: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL,
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=question)]),
        params=pb.SamplingParams(**{"temperature": 0, "max_tokens": max_tokens, **params}),
    )


def run(stub: pb_grpc.InferencePoolStub, request: pb.GenerateRequest) -> tuple[str, list[int]]:
    text, ids = "", []
    for msg in stub.Generate(request, timeout=120):
        text += msg.text
        ids += list(msg.token_ids)
    return text, ids


def test_streams_a_real_answer_with_usage(pool: Pool) -> None:
    msgs = list(pool.stub.Generate(chat_request(QUESTIONS[0], 24), timeout=60))
    assert len(msgs) > 3  # streamed token by token
    assert "Paris" in "".join(m.text for m in msgs)
    last = msgs[-1]
    assert last.finished and last.finish_reason == "stop"
    assert last.usage.completion_tokens == sum(len(m.token_ids) for m in msgs)
    assert last.usage.prompt_tokens > 10
    assert pool.status() == health_pb2.HealthCheckResponse.SERVING


def test_32_concurrent_streams_equal_each_alone(pool: Pool) -> None:
    requests = [chat_request(QUESTIONS[i % 8] + " " * (i // 8), 12) for i in range(32)]
    with ThreadPoolExecutor(32) as ex:
        together = list(ex.map(lambda r: run(pool.stub, r), requests))
    alone = [run(pool.stub, r) for r in requests]
    assert all(0 < len(ids) <= 12 and text for text, ids in together)
    assert together == alone


def test_cancel_frees_the_kv_cache_within_a_second(pool: Pool) -> None:
    idle = pool.stub.Load(pb.LoadRequest()).models[0].kv_cache_free_blocks
    stream = pool.stub.Generate(chat_request("Write a long story about a dragon.", 400))
    next(stream)
    busy = pool.stub.Load(pb.LoadRequest()).models[0]
    assert busy.running == 1 and busy.kv_cache_free_blocks < idle
    stream.cancel()
    cancelled = time.monotonic()
    while pool.stub.Load(pb.LoadRequest()).models[0].kv_cache_free_blocks != idle:
        assert time.monotonic() - cancelled < 1.0, "KV blocks not freed within 1 s of cancel"
        time.sleep(0.02)


def test_errors_carry_status_codes_and_name_the_field(pool: Pool) -> None:
    cases = [
        (chat_request("hi", temperature=3.0), grpc.StatusCode.INVALID_ARGUMENT, "'temperature'"),
        (chat_request("hi", top_p=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "'top_p'"),
        (chat_request("hi", n=99), grpc.StatusCode.INVALID_ARGUMENT, "'n'"),
        (pb.GenerateRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "'chat'"),
        (pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=[1] * 2000)),
         grpc.StatusCode.INVALID_ARGUMENT, "'messages': the prompt has 2000 tokens"),
        (pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=[10**9])),
         grpc.StatusCode.INVALID_ARGUMENT, "'prompt': "),
        (pb.GenerateRequest(model="gpt-9", prompt="hi"), grpc.StatusCode.NOT_FOUND, "gpt-9"),
    ]  # fmt: skip
    for request, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(pool.stub.Generate(request, timeout=30))
        assert err.value.code() == code, err.value.details()
        assert words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        pool.stub.Embed(pb.EmbedRequest(model=MODEL, texts=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_embeddings_tokenize_and_models(pool: Pool) -> None:
    got = pool.stub.Embed(pb.EmbedRequest(
        model="all-MiniLM-L6-v2", texts=["eating food", "eating bread", "carrying a baby"]
    ), timeout=30)  # fmt: skip
    food, bread, baby = (list(e.values) for e in got.embeddings)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert len(food) == 384 and cos(food, bread) > cos(food, baby) + 0.3
    ids = pool.stub.Tokenize(pb.TokenizeRequest(model=MODEL, text="Hello there")).token_ids
    text = pool.stub.Detokenize(pb.DetokenizeRequest(model=MODEL, token_ids=ids)).text
    assert text == "Hello there"
    kinds = {m.id: m.kind for m in pool.stub.ListModels(pb.ListModelsRequest()).models}
    assert kinds == {MODEL: "chat", "all-MiniLM-L6-v2": "embedding"}


def test_a_full_queue_is_refused_at_once(model_home: Path, tmp_path: Path) -> None:
    busy = Pool(model_home, tmp_path, "--embedding-model", "none", "--max-num-seqs", "1",
                "--max-waiting-requests", "2")  # fmt: skip
    try:

        def attempt(i: int) -> tuple[str, float]:
            start = time.monotonic()
            try:
                run(busy.stub, chat_request(QUESTIONS[i % 8], 24))
                return "ok", time.monotonic() - start
            except grpc.RpcError as err:
                return err.code().name, time.monotonic() - start

        with ThreadPoolExecutor(12) as ex:
            results = list(ex.map(attempt, range(12)))
        refused = [t for code, t in results if code == "RESOURCE_EXHAUSTED"]
        assert refused and max(refused) < 1.0, results
        assert sum(code == "ok" for code, _ in results) >= 2, results
    finally:
        busy.close()


def test_sigterm_lets_in_flight_streams_finish_then_exits_0(
    model_home: Path, tmp_path: Path
) -> None:
    p = Pool(model_home, tmp_path, "--embedding-model", "none")
    try:

        def stream(i: int) -> tuple[str, int]:
            msgs = list(p.stub.Generate(chat_request(QUESTIONS[i], 32, ignore_eos=True),
                                        timeout=120))  # fmt: skip
            return msgs[-1].finish_reason, sum(len(m.token_ids) for m in msgs)

        with ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(stream, i) for i in range(8)]
            while p.stub.Load(pb.LoadRequest()).models[0].running < 8:
                time.sleep(0.02)
            p.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert p.status() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(p.stub.Generate(chat_request("hi"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert [f.result(timeout=120) for f in futures] == [("length", 32)] * 8
        assert p.proc.wait(30) == 0
    finally:
        p.close()


def test_health_follows_a_stalled_and_a_dead_engine(model_home: Path, tmp_path: Path) -> None:
    """Fault injection (a hidden flag): SIGUSR1 hangs the engine loop for 5 s, SIGUSR2 kills
    it. Health must turn NOT_SERVING within seconds of either, and back after the stall."""
    p = Pool(model_home, tmp_path, "--embedding-model", "none", "--stall-timeout", "1",
             "--fault-injection")  # fmt: skip
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip

    def wait_for(status: int, within: float) -> float:
        start = time.monotonic()
        while p.status() != status:
            assert time.monotonic() - start < within, f"health did not become {status}"
            time.sleep(0.05)
        return time.monotonic() - start

    try:
        assert p.status() == serving
        with ThreadPoolExecutor(1) as ex:
            stream = ex.submit(run, p.stub, chat_request("Tell me a story.", 60, ignore_eos=True))
            while p.stub.Load(pb.LoadRequest()).models[0].running < 1:
                time.sleep(0.02)
            p.proc.send_signal(signal.SIGUSR1)
            assert wait_for(not_serving, within=3.0) < 3.0
            wait_for(serving, within=10.0)  # the stall ends, the engine steps again
            assert len(stream.result(timeout=60)[1]) == 60
        p.proc.send_signal(signal.SIGUSR2)
        wait_for(not_serving, within=3.0)
        with pytest.raises(grpc.RpcError) as err:
            list(p.stub.Generate(chat_request("hi"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        p.close()


def test_mtls_accepts_only_clients_with_a_certificate_from_the_ca(
    model_home: Path, tmp_path: Path
) -> None:
    pytest.importorskip("cryptography")
    from tls_testing import make_pki

    pki = make_pki(tmp_path)
    p = Pool(model_home, tmp_path, "--embedding-model", "none", "--tls-cert", str(pki["server"]),
             "--tls-key", str(pki["server_key"]), "--tls-client-ca", str(pki["ca"]),
             secure=pki)  # fmt: skip
    try:
        text, _ = run(p.stub, chat_request(QUESTIONS[0], 24))
        assert "Paris" in text
        address = f"127.0.0.1:{p.port}"
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        for channel in (grpc.secure_channel(address, no_cert), grpc.insecure_channel(address)):
            with channel, pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferencePoolStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A gateway presents its client certificate (--pool-tls-*); one without is refused.
        import httpx
        from process_testing import Process

        tls = ["--pool-tls-ca", str(pki["ca"])]
        pair = ["--pool-tls-cert", str(pki["client"]), "--pool-tls-key", str(pki["client_key"])]
        gateways = {}
        for name, extra in (("mtls", [*tls, *pair]), ("no-cert", tls)):
            port = free_port()
            gateways[name] = (port, Process(
                ["gateway", "--port", str(port), "--pool", address, "--insecure-no-auth", *extra],
                dict(os.environ), tmp_path / f"gateway-{name}.log"))  # fmt: skip
        try:
            port, mtls = gateways["mtls"]
            url = f"http://127.0.0.1:{port}"
            mtls.ready(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, 60)
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert reply.status_code == 200, reply.text
            port, plain = gateways["no-cert"]
            url = f"http://127.0.0.1:{port}"
            plain.ready(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60)
            time.sleep(1.5)  # a refresh or two: the pool still refuses it
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
        finally:
            for _, process in gateways.values():
                process.stop()
    finally:
        p.close()


def test_bad_tls_files_and_port_fail_with_a_clear_message(tmp_path: Path) -> None:
    for args, env, message in [
        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "none.key")], {},
         "tls_key: cannot read"),
        (["--tls-cert", str(tmp_path / "none.pem")], {}, "give both or neither"),
        ([], {"PORT": "http"}, "PORT: must be a port number"),
    ]:  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "helixflow", "pool", "--embedding-model", "none", *args],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_prometheus_metrics_count_what_was_served(pool: Pool) -> None:
    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{pool.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln[:1] != "#")}

    label = f'{{model="{MODEL}"}}'
    before = scrape()
    _, ids = run(pool.stub, chat_request(QUESTIONS[2], 10))
    after = scrape()
    generated = f"helixflow_pool_generation_tokens_total{label}"
    assert after[generated] - before.get(generated, 0) == len(ids)
    ok = f'helixflow_pool_requests_total{{model="{MODEL}",outcome="ok",rpc="Generate"}}'
    assert after[ok] - before.get(ok, 0) == 1
    ttft = f"helixflow_pool_time_to_first_token_seconds_count{label}"
    assert after[ttft] - before.get(ttft, 0) == 1
    assert after[f"helixflow_pool_kv_cache_usage{label}"] >= 0
    assert f"helixflow_pool_requests_running{label}" in after
    assert f"helixflow_pool_prefix_cache_hit_rate{label}" in after
