"""Auth on the gateway's hot path, and how fast a revocation reaches a gateway.

Method: start a real ``helixflow auth`` (SQLite in a temporary directory) and a gateway-side
`AuthClient` subscribed to its revocation stream, in this process on its own event loop.

1. Validation cost per request, each the median of `--calls` sequential calls (the client's
   calls are timed on the client's own event loop, as a gateway makes them):
   - JWT first sight: the RS256 signature and claims check a token gets on its first use;
   - JWT again: `AuthClient.authenticate` of a token seen before (the check is remembered
     until the token expires; time claims and the streamed revocation list are checked);
   - JWT, online (baseline): the auth service's `ValidateToken` over gRPC (a round trip plus a
     store lookup per request, what a gateway without the stream would do);
   - API key, cached: `AuthClient.authenticate(hfx_ key)` after the first call;
   - API key, online (baseline): `ValidateApiKey` over gRPC each time.
2. Revocation delay: `--revocations` times, log in, check the token at the client, revoke it
   through the HTTP API (``POST /v1/auth/revoke``) and record when the revocation is applied at
   the client relative to the moment the HTTP answer arrived (negative: before). Baseline:
   the same revocation written straight into the database by another process (what
   ``helixflow admin revoke`` does), which the service finds by its one-second store poll.

    python bench/bench_auth.py
    python bench/bench_auth.py --calls 200 --revocations 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from helixflow._proto import auth_pb2 as pb
from helixflow._proto import auth_pb2_grpc as pb_grpc
from helixflow.auth.client import AuthClient
from helixflow.auth.signing_keys import generate_master_key
from helixflow.auth.store import open_store

PASSWORD = "bench password 1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median_us(fn: Any, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--revocations", type=int, default=50)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    db = work / "auth.db"
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "HELIXFLOW_MASTER_KEY": generate_master_key(),
           "DATABASE_TYPE": "sqlite", "DATABASE_PATH": str(db)}  # fmt: skip
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, "-m", "helixflow", "admin", "create-user", "bench",
                    "--password-stdin"], input=PASSWORD + "\n", env=env, check=True, text=True,
                   capture_output=True)  # fmt: skip
    log = (work / "auth.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "helixflow", "auth", "--port", str(grpc_port),
                             "--http-port", str(http_port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    http = httpx.Client(base_url=url, timeout=30)
    deadline = time.monotonic() + 60
    while True:
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    client = AuthClient(f"127.0.0.1:{grpc_port}", name="bench")
    arrivals: dict[str, float] = {}
    client.on_revocation = lambda event: arrivals.__setitem__(event.value, time.perf_counter())
    run(client.start())
    stub = pb_grpc.AuthStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))

    def login() -> dict[str, Any]:
        reply = http.post("/v1/auth/login", json={"username": "bench", "password": PASSWORD})
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    tokens = login()
    token = tokens["access_token"]
    key = http.post("/v1/api-keys", json={}, headers={"Authorization": f"Bearer {token}"}
                    ).json()["key"]  # fmt: skip
    run(client.authenticate(key))

    print(f"# bench_auth: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; auth on SQLite, client in-process")  # fmt: skip
    print(f"\n## validation cost per request (median of {args.calls} sequential calls)\n")

    async def on_loop(credential: str) -> float:
        """Median µs of `client.authenticate` timed on the client's own loop (as a gateway
        calls it)."""
        times = []
        for _ in range(args.calls):
            start = time.perf_counter_ns()
            await client.authenticate(credential)
            times.append(time.perf_counter_ns() - start)
        return statistics.median(times) / 1e3

    verify = client._verifier.verify  # the RS256 + claims check a new token goes through
    rows = [
        ("JWT first sight: RS256 signature + claims", median_us(lambda: verify(token), args.calls)),
        ("JWT again (AuthClient: remembered check + revocation list)", run(on_loop(token))),
        (
            "JWT, online ValidateToken over gRPC (baseline)",
            median_us(lambda: stub.ValidateToken(pb.ValidateTokenRequest(token=token)), args.calls),
        ),
        ("API key, cached (AuthClient)", run(on_loop(key))),
        (
            "API key, online ValidateApiKey over gRPC (baseline)",
            median_us(
                lambda: stub.ValidateApiKey(pb.ValidateApiKeyRequest(api_key=key)), args.calls
            ),
        ),
    ]
    print("| path | µs per call |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.0f} |")
    print(
        f"\nvs the online baseline: a new JWT checked locally {rows[2][1] / rows[0][1]:.1f}x "
        f"faster, a repeated JWT {rows[2][1] / rows[1][1]:.0f}x, a cached API key "
        f"{rows[4][1] / rows[3][1]:.0f}x"
    )
    print(f"\n## revocation delay ({args.revocations} each)\n")
    stream: list[float] = []
    for _ in range(args.revocations):
        access = login()["access_token"]
        run(client.authenticate(access))
        reply = http.post("/v1/auth/revoke", json={"token": access},
                          headers={"Authorization": f"Bearer {access}"})  # fmt: skip
        answered = time.perf_counter()
        jti = reply.json()["value"]
        while jti not in arrivals:
            time.sleep(0.0002)
        stream.append((arrivals[jti] - answered) * 1e3)
    polled: list[float] = []
    store = open_store("sqlite", path=db)
    for i in range(max(5, args.revocations // 5)):
        jti = f"bench-poll-{i}-{time.monotonic_ns()}"
        written = time.perf_counter()
        store.add_revocation("jti", jti, expires_at=time.time() + 600)
        while jti not in arrivals:
            time.sleep(0.0005)
        polled.append((arrivals[jti] - written) * 1e3)
    store.close()
    print("| path | median ms | max ms |\n|---|---:|---:|")
    print(f"| HTTP revoke -> stream (after the HTTP answer) | {statistics.median(stream):+.2f} | "
          f"{max(stream):+.2f} |")  # fmt: skip
    print(f"| database write -> store poll -> stream (baseline) | "
          f"{statistics.median(polled):+.1f} | {max(polled):+.1f} |")  # fmt: skip

    run(client.close())
    http.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
