"""Gateway overhead: requests/s and latency direct to an upstream, through the HelixFlow
gateway, and through LiteLLM's proxy, in one run on the same machine.

Method:
- upstream: a minimal OpenAI-compatible server (asyncio + uvloop, one process) that answers
  every ``POST /v1/chat/completions`` with the same small ChatCompletion at once;
- HelixFlow: `helixflow auth` (SQLite) and `helixflow gateway` (one worker) with the upstream as
  the model's backend; every request carries an API key with RPM/TPM limits (high enough never
  to trip), so authentication and rate limiting run on every request; plain HTTP, and a second
  gateway over TLS 1.3;
- LiteLLM: `litellm --config ... --num_workers 1` (no database; its master key checked on every
  request) with the same upstream, plain HTTP; skipped unless `--litellm` names its executable;
- load: this process, a lean HTTP/1.1 keep-alive client on uvloop, `C` connections each
  sending requests back to back for `--duration` seconds (after a warm-up), for C in
  `--concurrency`; reported: requests/s, p50 and p99 latency per target, and against the direct
  baseline the added p50 latency.

Targets (issue 7): added p50 <= 0.5 ms at concurrency 1, and >= 25x LiteLLM's requests/s.

    python bench/bench_gateway.py --litellm /path/to/venv/bin/litellm
    python bench/bench_gateway.py --duration 2 --concurrency 1 16     # quick, no LiteLLM
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BODY = json.dumps(
    {
        "model": "bench-model",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hello there"}],
    }
).encode()
ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
).encode()


# -- the upstream ----------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers every complete HTTP/1.1 request with ANSWER (keep-alive)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )


def serve_upstream(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


# -- the load --------------------------------------------------------------------------------


async def _worker(
    host: str,
    port: int,
    path: str,
    headers: bytes,
    ctx: ssl.SSLContext | None,
    stop_at: float,
    warm_until: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname="localhost" if ctx else None
    )
    request = (
        (
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(BODY)}\r\n"
        ).encode()
        + headers
        + b"\r\n"
        + BODY
    )
    while True:
        start = time.perf_counter()
        if start >= stop_at:
            break
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at >= 0:
            await reader.readexactly(int(lower[at + 15 :].split(b"\r\n", 1)[0]))
        else:  # chunked
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        if start >= warm_until:
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
    writer.close()


def run_load(
    host: str,
    port: int,
    path: str,
    key: str | None,
    concurrency: int,
    duration: float,
    ctx: ssl.SSLContext | None,
) -> dict[str, float]:
    import uvloop

    headers = b"" if key is None else f"authorization: Bearer {key}\r\n".encode()
    latencies: list[float] = []
    errors: list[int] = []

    async def main() -> None:
        now = time.perf_counter()
        warm, stop = now + min(1.0, duration / 4), now + min(1.0, duration / 4) + duration
        await asyncio.gather(
            *(
                _worker(host, port, path, headers, ctx, stop, warm, latencies, errors)
                for _ in range(concurrency)
            )
        )

    uvloop.run(main())
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. HTTP {errors[0]}")
    latencies.sort()
    return {
        "rps": len(latencies) / duration,
        "p50": statistics.median(latencies) * 1e3,
        "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
        "n": len(latencies),
    }


# -- the processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"a process exited early:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1/localhost (never committed)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--litellm", help="the `litellm` executable (its own venv)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], env: dict[str, str], name: str, port: int) -> None:
        log = work / f"{name}.log"
        proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_port(port, proc, log)

    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    from helixflow.auth.signing_keys import generate_master_key

    env.update(
        HELIXFLOW_MASTER_KEY=generate_master_key(),
        DATABASE_TYPE="sqlite",
        DATABASE_PATH=str(work / "auth.db"),
    )
    try:
        upstream = free_port()
        start(
            [sys.executable, __file__, "--serve-upstream", str(upstream)], env, "upstream", upstream
        )
        auth_grpc, auth_http = free_port(), free_port()
        start(
            [
                sys.executable,
                "-m",
                "helixflow",
                "auth",
                "--port",
                str(auth_grpc),
                "--http-port",
                str(auth_http),
            ],
            env,
            "auth",
            auth_http,
        )
        helix = [sys.executable, "-m", "helixflow", "admin"]
        subprocess.run(
            [*helix, "create-user", "bench", "--password-stdin"],
            env=env,
            check=True,
            input=b"bench password 1\n",
            capture_output=True,
        )
        made = subprocess.run(
            [
                *helix,
                "create-key",
                "bench",
                "--rpm",
                "100000000",
                "--tpm",
                "1000000000000",
                "--json",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        key = json.loads(made.stdout)["key"]
        config = work / "helixflow.toml"
        config.write_text(
            f'[[models]]\nid = "bench-model"\n'
            f'backends = [{{ openai = "http://127.0.0.1:{upstream}/v1" }}]\n'
        )
        gateway, gateway_tls = free_port(), free_port()
        cert, cert_key = self_signed(work)
        for port, tls in (
            (gateway, []),
            (gateway_tls, ["--tls-cert", str(cert), "--tls-key", str(cert_key)]),
        ):
            start(
                [
                    sys.executable,
                    "-m",
                    "helixflow",
                    "gateway",
                    "--port",
                    str(port),
                    "--config",
                    str(config),
                    "--auth",
                    f"127.0.0.1:{auth_grpc}",
                    *tls,
                ],
                env,
                f"gateway-{port}",
                port,
            )
        time.sleep(1.0)  # the gateways' first backend probe and auth sync
        targets: list[tuple[str, int, str, str | None, ssl.SSLContext | None]] = [
            ("direct (baseline)", upstream, "/v1/chat/completions", None, None),
            ("helixflow gateway", gateway, "/v1/chat/completions", key, None),
        ]
        client_tls = ssl.create_default_context(cafile=str(cert))
        targets.append(
            ("helixflow gateway, TLS 1.3", gateway_tls, "/v1/chat/completions", key, client_tls)
        )
        if args.litellm:
            litellm_port = free_port()
            (work / "litellm.yaml").write_text(
                "model_list:\n  - model_name: bench-model\n    litellm_params:\n"
                f"      model: openai/bench-model\n      api_base: http://127.0.0.1:{upstream}/v1\n"
                "      api_key: none\n"
            )
            litellm_key = "sk-" + secrets.token_hex(16)  # LiteLLM checks its master key
            start(
                [
                    args.litellm,
                    "--config",
                    str(work / "litellm.yaml"),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                {**env, "LITELLM_MASTER_KEY": litellm_key},
                "litellm",
                litellm_port,
            )
            time.sleep(2.0)
            targets.append(
                ("litellm proxy", litellm_port, "/v1/chat/completions", litellm_key, None)
            )

        print(
            f"# bench_gateway {datetime.date.today()}: {platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{args.duration:g} s per cell after warm-up; one worker per server"
        )
        results: dict[tuple[str, int], dict[str, float]] = {}
        print("\n| target | concurrency | req/s | p50 ms | p99 ms | added p50 ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for concurrency in args.concurrency:
            for name, port, path, credential, ctx in targets:
                cell = run_load(
                    "127.0.0.1", port, path, credential, concurrency, args.duration, ctx
                )
                results[(name, concurrency)] = cell
                base = results[("direct (baseline)", concurrency)]
                added = "-" if name.startswith("direct") else f"{cell['p50'] - base['p50']:.2f}"
                print(
                    f"| {name} | {concurrency} | {cell['rps']:.0f} | {cell['p50']:.2f} | "
                    f"{cell['p99']:.2f} | {added} |",
                    flush=True,
                )
        if args.litellm:
            print()
            for concurrency in args.concurrency:
                ours = results[("helixflow gateway", concurrency)]["rps"]
                theirs = results[("litellm proxy", concurrency)]["rps"]
                print(
                    f"concurrency {concurrency}: helixflow / litellm requests/s = "
                    f"{ours / theirs:.1f}x"
                )
        c1 = args.concurrency[0]
        added = (
            results[("helixflow gateway", c1)]["p50"] - results[("direct (baseline)", c1)]["p50"]
        )
        print(
            f"\nadded p50 at concurrency {c1}: {added:.2f} ms (target <= 0.5 ms: "
            f"{'PASS' if added <= 0.5 else 'MISS'})"
        )
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
