"""``helixflow serve``: the whole platform on one machine, as supervised child processes.

Monitoring, auth (SQLite), the inference pool (SmolLM2-135M-Instruct + all-MiniLM-L6-v2 by
default) and the gateway (HTTPS) start in that order, each as ``python -m helixflow <service>``;
their output is relayed line by line with a ``[service]`` prefix. A child that dies is
restarted with a doubling back-off (1 s up to 30 s; reset after a minute of health).
SIGINT/SIGTERM stop them in the reverse order (the gateway first), each with SIGTERM (they
drain) and SIGKILL after a grace period.

First start: certificates (`helixflow.certs`), the auth database with its master key, an admin
user with a random password and one API key, printed once with a curl and an openai-SDK
example. Missing known models are pulled first, with a progress bar on a terminal.
``state.json`` in the data directory names the children's pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from helixflow.serve_config import ServeConfig

__all__ = ["run_serve"]

BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
STOP_GRACE_S = 30.0


class Child:
    """One supervised service."""

    def __init__(self, name: str, args: list[str], ready: Callable[[], bool]) -> None:
        self.name = name
        self.args = args
        self.ready = ready
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.backoff = 1.0
        self.restarts = 0
        self.pump: asyncio.Task[None] | None = None


def _probe_http(url: str, ca: Path | None = None) -> bool:
    import ssl
    import urllib.request

    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _probe_grpc_pool(target: str) -> bool:
    import grpc

    from helixflow._proto import inference_pb2 as pb
    from helixflow._proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            stub = pb_grpc.InferencePoolStub(channel)  # type: ignore[no-untyped-call]
            return bool(stub.ListModels(pb.ListModelsRequest(), timeout=1).models)
        except grpc.RpcError:
            return False


class Supervisor:
    """Starts, relays, restarts and stops the children."""

    def __init__(self, children: list[Child], env: dict[str, str], state: Path,
                 out: TextIO = sys.stdout) -> None:  # fmt: skip
        self.children = children
        self.env = env
        self.state = state
        self.out = out
        self.stopping = False

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    async def _relay(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        prefix = f"[{child.name}] "
        while line := await child.proc.stdout.readline():
            self.out.write(prefix + line.decode(errors="replace"))
            self.out.flush()

    def _write_state(self) -> None:
        state = {c.name: {"pid": c.proc.pid if c.proc else None, "restarts": c.restarts}
                 for c in self.children}  # fmt: skip
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state)

    async def start(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "helixflow", *child.args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            # NOTE: each child in its own process group: a Ctrl-C on the terminal (or a service
            # signalling its own group) reaches only the supervisor, which stops them in order.
            start_new_session=True,
        )  # fmt: skip
        child.started_at = time.monotonic()
        child.pump = asyncio.create_task(self._relay(child))
        self._write_state()

    async def wait_ready(self, child: Child, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(child.ready):
            assert child.proc is not None
            if child.proc.returncode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} "
                                   "while starting (see its lines above)")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} was not ready within {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def watch(self) -> None:
        """Restart children that die, until `stopping`."""
        while not self.stopping:
            for child in self.children:
                proc = child.proc
                if proc is None or proc.returncode is None:
                    if proc is not None and time.monotonic() - child.started_at > STABLE_S:
                        child.backoff = 1.0
                    continue
                self.say(f"[serve] {child.name} exited with code {proc.returncode}; "
                         f"restarting in {child.backoff:.0f}s")  # fmt: skip
                await asyncio.sleep(child.backoff)
                if self.stopped():
                    return
                child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)
                child.restarts += 1
                await self.start(child)
            await asyncio.sleep(0.2)

    def stopped(self) -> bool:
        return self.stopping

    async def stop(self) -> None:
        self.stopping = True
        for child in reversed(self.children):  # the gateway first: it stops taking requests
            proc = child.proc
            if proc is None or proc.returncode is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                self.say(f"[serve] {child.name} did not stop in {STOP_GRACE_S:.0f}s; killing it")
                proc.kill()
                await proc.wait()
            if child.pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(child.pump, 5)
        self._write_state()


def _bootstrap(env: dict[str, str], database: Path) -> tuple[str, str] | None:
    """On a fresh database: an admin with a random password and an API key; else None."""
    from helixflow.auth.service import open_core, options_from_env

    class Args:
        database_type = "sqlite"
        database_path = str(database)

    core = open_core(options_from_env(Args(), env))
    try:
        if core.list_users():
            return None
        password = secrets.token_urlsafe(12)
        admin = core.create_user("admin", password, role="admin")
        _, key = core.create_api_key(admin, name="serve", scopes=("admin", "model:*"))
        return password, key
    finally:
        core.store.close()


def _banner(opts: ServeConfig, ca: Path, database: Path, made: tuple[str, str] | None,
            model: str) -> str:
    url = f"https://{'localhost' if opts.host in ('127.0.0.1', '0.0.0.0') else opts.host}" \
          f":{opts.port}"  # fmt: skip
    if made is None:
        who = ("API keys: the one printed on the first start, or make one with\n"
               f"  helixflow admin --database-path {database} create-key admin")  # fmt: skip
        key = "$HELIXFLOW_API_KEY"
    else:
        password, key = made
        who = (f"admin user: admin / {password}   (shown once)\n"
               f"API key:    {key}   (shown once; the store keeps only its hash)")  # fmt: skip
    status = f"http://127.0.0.1:{opts.monitor_http_port}/"
    return f"""
HelixFlow is up: {url}  (CA certificate: {ca})
status page: {status}
{who}

curl {url}/v1/chat/completions --cacert {ca} \\
  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

# with OpenAI's SDK (pip install openai):
python - <<'EOF'
import ssl, httpx, openai
tls = ssl.create_default_context(cafile="{ca}")
client = openai.OpenAI(base_url="{url}/v1", api_key="{key}",
                       http_client=httpx.Client(verify=tls))
reply = client.chat.completions.create(model="{model}",
                                       messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)
EOF
"""


async def run_serve(opts: ServeConfig, env: dict[str, str], *,
                    config_path: Path | None = None) -> int:
    """Run the platform until SIGINT/SIGTERM; returns the exit code."""
    from helixflow.certs import ensure_certs

    data = opts.data_path(env)
    data.mkdir(parents=True, exist_ok=True)
    certs = ensure_certs(data / "certs")
    database = data / "auth.db"
    env = {**env, "DATABASE_TYPE": "sqlite", "DATABASE_PATH": str(database)}
    # NOTE: every port and certificate is passed to each child as a flag: the variables one
    # service reads must not reach the others.
    for name in ("PORT", "HTTP_PORT", "TLS_CERT", "TLS_KEY"):
        env.pop(name, None)
    made = await asyncio.to_thread(_bootstrap, env, database)
    await asyncio.to_thread(_pull_missing, opts)
    models = [a for m in opts.models for a in ("--model", m)]
    embeds = [a for m in opts.embedding_models for a in ("--embedding-model", m)]
    pool_target = f"127.0.0.1:{opts.pool_port}"
    gateway_url = f"https://127.0.0.1:{opts.port}/ready"
    monitor_args = ["monitor", "--port", str(opts.monitor_port), "--http-port",
                    str(opts.monitor_http_port), "--auth-url",
                    f"http://127.0.0.1:{opts.auth_http_port}", "--pool", pool_target,
                    "--gateway-url", f"https://127.0.0.1:{opts.port}", "--ca", str(certs.ca)]
    children = [
        Child("monitor", monitor_args,
              lambda: _probe_http(f"http://127.0.0.1:{opts.monitor_http_port}/healthz")),
        Child("auth", ["auth", "--port", str(opts.auth_port), "--http-port",
                       str(opts.auth_http_port)],
              lambda: _probe_http(f"http://127.0.0.1:{opts.auth_http_port}/health")),
        Child("pool", ["pool", "--port", str(opts.pool_port), *models, *embeds,
                       *opts.pool_args()], lambda: _probe_grpc_pool(pool_target)),
        Child("gateway", ["gateway", "--host", opts.host, "--port", str(opts.port),
                          "--pool", pool_target, "--auth", f"127.0.0.1:{opts.auth_port}",
                          "--tls-cert", str(certs.server), "--tls-key", str(certs.server_key),
                          *(["--config", str(config_path)] if config_path else [])],
              lambda: _probe_http(gateway_url, certs.ca)),
    ]  # fmt: skip
    supervisor = Supervisor(children, env, data / "state.json")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher: asyncio.Task[None] | None = None
    try:
        for child in children:
            supervisor.say(f"[serve] starting {child.name}")
            await supervisor.start(child)
            waiting = asyncio.create_task(supervisor.wait_ready(child))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if waiting not in done:
                waiting.cancel()
                return 0 if await _shutdown(supervisor) else 1
            waiting.result()
        model = (opts.models or ["SmolLM2-135M-Instruct"])[0]
        supervisor.say(_banner(opts, certs.ca, database, made, model))
        watcher = asyncio.create_task(supervisor.watch())
        await stop.wait()
    except RuntimeError as exc:
        supervisor.say(f"[serve] error: {exc}")
        await _shutdown(supervisor)
        return 1
    finally:
        if watcher is not None:
            watcher.cancel()
    return 0 if await _shutdown(supervisor) else 1


def _pull_missing(opts: ServeConfig) -> None:
    """Pull every known model the pool will load that is not in the cache yet (a path, or a
    name the pool does not know, is left for the pool to report)."""
    from helixflow.pool.models.hub import KNOWN_MODELS, models_dir, pull

    names = [*(opts.models or ["SmolLM2-135M-Instruct"]),
             *(opts.embedding_models or ["all-MiniLM-L6-v2"])]  # fmt: skip
    for name in names:
        if name in KNOWN_MODELS and not (models_dir() / name).is_dir():
            pull(name)


async def _shutdown(supervisor: Supervisor) -> bool:
    supervisor.say("[serve] stopping")
    await supervisor.stop()
    codes = {c.name: c.proc.returncode for c in supervisor.children if c.proc is not None}
    supervisor.say(f"[serve] stopped: {codes}")
    return all(code == 0 for code in codes.values())
