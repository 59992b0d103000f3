"""The ``helixflow`` command line.

Subcommands:
    info    what is installed: versions, the native core's build, optional GPU stack
    pull    download a known model into the local cache (or check a local path)
    pool    run the inference pool's gRPC service (models loaded, pulled on first use)
    auth    run the auth service (gRPC for gateways, HTTP for people and tools)
    gateway run the OpenAI-compatible HTTPS gateway (auth, rate limits, routing)
    serve   run the whole platform on this machine (supervised; first start sets it up)
    certs   make the local CA and the services' TLS certificate
    admin   manage users, API keys, revocations and signing keys on the auth database

``helixflow serve`` and the other services arrive with later issues.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from helixflow import __version__

__all__ = ["main"]

_OPTIONAL_MODULES = ("torch", "triton", "numpy")


def _probe(module_name: str) -> str:
    """Describe whether `module_name` imports, without ever raising."""
    try:
        if importlib.util.find_spec(module_name) is None:
            return "not installed"
        module = importlib.import_module(module_name)
    # NOTE: broken installs fail in many ways (ImportError, OSError for a missing shared
    # library, RuntimeError from CUDA setup); `info` reports them instead of crashing.
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    return str(getattr(module, "__version__", "unknown version"))


def _probe_native() -> str:
    """Describe the compiled core, ``helixflow._native``, without ever raising."""
    try:
        native = importlib.import_module("helixflow._native")
    except Exception as exc:
        return f"import failed: {type(exc).__name__}: {exc}"
    return f"ok ({getattr(native, '__build_info__', 'no build info')})"


def _cmd_info(args: argparse.Namespace) -> int:
    rows = [
        ("helixflow", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("native", _probe_native()),
        *((name, _probe(name)) for name in _OPTIONAL_MODULES),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    # NOTE: imported here so `helixflow info` and `--help` stay fast and never touch the cache.
    from helixflow.errors import HelixFlowError
    from helixflow.pool.models.hub import pull

    try:
        path = pull(args.model, force=args.force, quiet=args.quiet)
    except HelixFlowError as exc:
        print(f"helixflow pull: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("helixflow pull: interrupted; nothing was added to the cache", file=sys.stderr)
        return 130
    print(path)
    return 0


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``helixflow pool`` flags (argparse)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="gRPC port (default: $PORT or 50051)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME|PATH",
        help="chat model to serve (repeatable; default SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--embedding-model",
        action="append",
        dest="embedding_models",
        metavar="NAME|PATH",
        help="embedding model (repeatable; default all-MiniLM-L6-v2; 'none')",
    )
    parser.add_argument("--max-model-len", type=int, help="context length cap")
    parser.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: from memory)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="running sequences cap")
    parser.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="queued requests before RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    parser.add_argument("--stall-timeout", type=float, default=10.0,
                        help="health turns NOT_SERVING when an engine with work finishes no "
                        "step for this many seconds")  # fmt: skip
    parser.add_argument("--fault-injection", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="Prometheus metrics over HTTP (default: gRPC port + 1; 0: off)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate "
                        "chain (default: $TLS_CERT; plaintext without one)")  # fmt: skip
    parser.add_argument("--tls-key", metavar="PEM", help="its private key (default: $TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mTLS)",
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--register", metavar="REDIS_URL",
                        help="register in this Redis (a heartbeat every second) so that gateways "
                        "with --discover-pools find this pool (default: $HELIXFLOW_REGISTER)")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="the address gateways dial (default: $HELIXFLOW_ADVERTISE, else "
                        "--host:--port, with this host's address for 0.0.0.0)")  # fmt: skip


def _cmd_pool(args: argparse.Namespace) -> int:
    import os

    from helixflow.logs import configure_logging
    from helixflow.pool.service import options_from_args, serve

    configure_logging(args.log_format)
    return _run_service("pool", lambda: serve(options_from_args(args, os.environ)))


def _run_service(name: str, make: Callable[[], Any]) -> int:
    """Run the coroutine `make()` returns; a HelixFlowError or OSError (from building the
    options or from serving) is printed as one line and exits 1."""
    import asyncio

    from helixflow.errors import HelixFlowError

    try:
        # NOTE: the default asyncio loop: grpc.aio does not support uvloop.
        return int(asyncio.run(_call(make)))
    except (HelixFlowError, OSError) as exc:
        message = exc.message if isinstance(exc, HelixFlowError) else str(exc)
        print(f"helixflow {name}: error: {message}", file=sys.stderr)
        return 1


async def _call(make: Callable[[], Any]) -> Any:
    return await make()


def _add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="gRPC port (default: $PORT or 8081)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: $HTTP_PORT or 8082)")
    parser.add_argument("--database-type", choices=("sqlite", "postgres"),
                        help="default: $DATABASE_TYPE or sqlite")  # fmt: skip
    parser.add_argument("--database-path", help="SQLite file (default: $DATABASE_PATH or "
                        "$HELIXFLOW_HOME/auth.db)")  # fmt: skip
    parser.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    parser.add_argument("--redis-url", help="relay revocations between replicas "
                        "(default: $REDIS_URL)")  # fmt: skip
    parser.add_argument("--issuer", help="JWT iss (default: $HELIXFLOW_JWT_ISSUER or helixflow)")
    parser.add_argument("--audience",
                        help="JWT aud (default: $HELIXFLOW_JWT_AUDIENCE or helixflow)")  # fmt: skip
    parser.add_argument("--access-ttl", type=float, metavar="SECONDS",
                        help="access token lifetime (default: 900)")  # fmt: skip
    parser.add_argument("--refresh-ttl", type=float, metavar="SECONDS",
                        help="login session lifetime (default: 30 days)")  # fmt: skip
    parser.add_argument("--allow-registration", action="store_true",
                        help="let anyone sign up (POST /v1/auth/register)")  # fmt: skip
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS on both ports "
                        "(default: $TLS_CERT)")  # fmt: skip
    parser.add_argument("--tls-key", metavar="PEM", help="its private key (default: $TLS_KEY)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def _cmd_env_service(name: str, module: str, args: argparse.Namespace) -> int:
    """Run the service of `module` (its ``options_from_env`` and ``serve``) from flags + env."""
    import importlib
    import os

    from helixflow.logs import configure_logging

    service = importlib.import_module(module)
    configure_logging(args.log_format)
    return _run_service(name, lambda: service.serve(service.options_from_env(args, os.environ)))


def _cmd_auth(args: argparse.Namespace) -> int:
    return _cmd_env_service("auth", "helixflow.auth.service", args)


def _add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTPS port (default: $PORT or 8443)")
    parser.add_argument("--config", metavar="TOML", help="model registry and limits (default: "
                        "$HELIXFLOW_CONFIG or ./helixflow.toml)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="granian worker processes (default 1)")
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate (default: $TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key (default: $TLS_KEY)")
    parser.add_argument("--pool", action="append", dest="pool_urls", metavar="HOST:PORT",
                        help="inference pool(s) when the config names no models "
                        "(default: $INFERENCE_POOL_URL or 127.0.0.1:50051)")  # fmt: skip
    parser.add_argument("--auth-tls-ca", metavar="PEM",
                        help="auth serves gRPC over TLS: the CA that signed its certificate")
    parser.add_argument("--pool-tls-ca", metavar="PEM", help="the pools serve TLS: their CA")
    parser.add_argument("--pool-tls-cert", metavar="PEM",
                        help="the pools require client certificates (mTLS): the gateway's")
    parser.add_argument("--pool-tls-key", metavar="PEM", help="its private key")
    parser.add_argument("--auth", dest="auth_grpc", metavar="HOST:PORT",
                        help="auth service gRPC (default: $AUTH_SERVICE_GRPC or "
                        "127.0.0.1:8081)")  # fmt: skip
    parser.add_argument("--redis-url", help="shared rate limits (default: $REDIS_URL)")
    parser.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                        help="on SIGTERM, how long open requests get to finish (default 30)")
    parser.add_argument("--discover-pools", action="store_true", default=None,
                        help="also route to the pools registered in Redis (--redis-url; "
                        "pools started with --register)")  # fmt: skip
    parser.add_argument("--rate-limit-failure", choices=("open", "closed"),
                        help="while Redis is down: admit without limits (open, the default) or "
                        "refuse with 503 (closed); $HELIXFLOW_RATE_LIMIT_FAILURE")  # fmt: skip
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--insecure-no-auth", action="store_true", help=argparse.SUPPRESS)


def _cmd_gateway(args: argparse.Namespace) -> int:
    import os

    from helixflow.errors import HelixFlowError
    from helixflow.gateway.config import load_config
    from helixflow.logs import configure_logging

    configure_logging(args.log_format)
    flags = {k: getattr(args, k) for k in ("host", "port", "workers", "tls_cert", "tls_key",
                                           "pool_urls", "auth_grpc", "redis_url", "log_format",
                                           "rate_limit_failure", "discover_pools",
                                           "shutdown_timeout", "pool_tls_ca", "pool_tls_cert",
                                           "pool_tls_key", "auth_tls_ca")}
    flags["insecure_no_auth"] = args.insecure_no_auth or None
    try:
        config = load_config(flags, os.environ, config_path=args.config)
        from helixflow.gateway.server import run

        return run(config)
    except (HelixFlowError, OSError) as exc:
        message = exc.message if isinstance(exc, HelixFlowError) else str(exc)
        print(f"helixflow gateway: error: {message}", file=sys.stderr)
        return 1


def _add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="gRPC port (default: $PORT or 8083)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: $HTTP_PORT or 8084)")
    parser.add_argument("--auth-url", help="auth HTTP (default: $AUTH_SERVICE_URL or "
                        "http://127.0.0.1:8082; empty: not monitored)")  # fmt: skip
    parser.add_argument("--pool", metavar="HOST:PORT", help="pool gRPC (default: $INFERENCE_"
                        "POOL_URL or 127.0.0.1:50051; empty: not monitored)")  # fmt: skip
    parser.add_argument("--pool-metrics-url", help="pool metrics (default: $POOL_METRICS_URL or "
                        "http://HOST:PORT+1/metrics)")  # fmt: skip
    parser.add_argument("--gateway-url", help="gateway (default: $GATEWAY_URL or "
                        "https://127.0.0.1:8443; empty: not monitored)")  # fmt: skip
    parser.add_argument("--ca", metavar="PEM", help="CA bundle that verifies the services' "
                        "certificates (default: $HELIXFLOW_CA, else the system's)")  # fmt: skip
    parser.add_argument("--interval", type=float, metavar="SECONDS",
                        help="poll every SECONDS (default 1)")  # fmt: skip
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS (default: $TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key (default: $TLS_KEY)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def _cmd_monitor(args: argparse.Namespace) -> int:
    return _cmd_env_service("monitor", "helixflow.monitoring.service", args)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from helixflow.errors import HelixFlowError
    from helixflow.serve import run_serve
    from helixflow.serve_config import config_file, load_serve_config

    keys = ("host", "port", "pool_port", "auth_port", "auth_http_port", "monitor_port",
            "monitor_http_port", "data_dir", "models", "embedding_models", "max_model_len",
            "device")  # fmt: skip
    try:
        path = config_file(args.config, os.environ)
        config = load_serve_config({k: getattr(args, k) for k in keys}, os.environ,
                                   config_path=path)  # fmt: skip
        return asyncio.run(run_serve(config, dict(os.environ), config_path=path))
    except (HelixFlowError, OSError) as exc:
        message = exc.message if isinstance(exc, HelixFlowError) else str(exc)
        print(f"helixflow serve: error: {message}", file=sys.stderr)
        return 1


def _cmd_certs(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from helixflow.certs import ensure_certs
    from helixflow.serve_config import ServeConfig

    directory = Path(args.dir) if args.dir else ServeConfig().data_path(os.environ) / "certs"
    paths = ensure_certs(directory, args.hosts or (), force=args.force)
    print(f"CA: {paths.ca}\ncertificate: {paths.server}\nkey: {paths.server_key} (0600)")
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    import os

    from helixflow.auth.admin import gen_master_key, run_admin
    from helixflow.auth.service import open_core, options_from_env
    from helixflow.errors import HelixFlowError

    if args.admin_command == "gen-master-key":
        return gen_master_key()
    core = None
    try:
        opts = options_from_env(args, os.environ)
        core = open_core(opts)
        return run_admin(args, core, opts.redis_url)
    except HelixFlowError as exc:
        print(f"helixflow admin: error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"helixflow admin: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if core is not None:
            core.store.close()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helixflow",
        description="HelixFlow: a self-hosted, OpenAI-compatible AI inference platform.",
    )
    parser.add_argument("--version", action="version", version=f"helixflow {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="show versions and how the native core was built")
    info.set_defaults(handler=_cmd_info)
    pull = commands.add_parser(
        "pull",
        help="download a known model into the local cache and print its path",
        description="Download a known model (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) into "
        "$HELIXFLOW_HOME/models, verifying every file's sha256, and print its local path. "
        "A path to a .gguf file or a Hugging Face model directory is checked and printed as is.",
    )
    pull.add_argument("model", metavar="NAME|PATH", help="a known model name or a local path")
    pull.add_argument(
        "--force", action="store_true", help="download again, replacing a cached (corrupt) copy"
    )
    pull.add_argument("--quiet", action="store_true", help="print only the final path")
    pull.set_defaults(handler=_cmd_pull)
    pool = commands.add_parser(
        "pool",
        help="run the inference pool (gRPC, default 127.0.0.1:50051)",
        description="Serve chat and embedding models over gRPC (protos/inference.proto) with "
        "grpc.health.v1 health. SIGTERM drains: in-flight requests finish, then exit 0.",
    )
    _add_pool_arguments(pool)
    pool.set_defaults(handler=_cmd_pool)
    auth = commands.add_parser(
        "auth",
        help="run the auth service (gRPC :8081, HTTP :8082)",
        description="Serve users, logins, API keys, revocations and the JWKS: gRPC for "
        "gateways (protos/auth.proto), HTTP for people and tools. SQLite by default "
        "($HELIXFLOW_HOME/auth.db), PostgreSQL with --database-type postgres. The master key "
        "that encrypts signing keys at rest: $HELIXFLOW_MASTER_KEY or "
        "$HELIXFLOW_MASTER_KEY_FILE (made next to a SQLite database when neither is set).",
    )
    _add_auth_arguments(auth)
    auth.set_defaults(handler=_cmd_auth)
    gateway = commands.add_parser(
        "gateway",
        help="run the OpenAI-compatible gateway (HTTPS :8443)",
        description="Serve OpenAI's REST API (chat, completions, embeddings, models) with "
        "authentication (API keys and JWTs through `helixflow auth`), per-key rate limits and "
        "routing to inference pools or upstream OpenAI-compatible APIs. TLS 1.3 with "
        "--tls-cert/--tls-key (or TLS_CERT/TLS_KEY); plain HTTP otherwise, with a warning.",
    )
    _add_gateway_arguments(gateway)
    gateway.set_defaults(handler=_cmd_gateway)
    monitor = commands.add_parser(
        "monitor",
        help="run monitoring (gRPC :8083, HTTP :8084: health, status page, dashboards)",
        description="Poll every service's health and Prometheus metrics once a second; serve "
        "the aggregated health (gRPC, and GET /health: 503 while any service is down), a live "
        "status page at /, a Prometheus scrape config (/prometheus.yml) and a Grafana "
        "dashboard (/grafana.json).",
    )
    _add_monitor_arguments(monitor)
    monitor.set_defaults(handler=_cmd_monitor)
    serve = commands.add_parser(
        "serve",
        help="run auth, the pool, the gateway and monitoring on this machine (HTTPS :8443)",
        description="Start monitoring, auth, the pool and the gateway as supervised children "
        "(restarted when they die; SIGINT/SIGTERM drain and stop them). The first start makes "
        "the TLS certificates, the auth database, an admin user and an API key, pulls missing "
        "models, and prints how to call the API. Every option is also a key of [serve] in "
        "helixflow.toml and the environment variable HELIXFLOW_<KEY> (e.g. "
        "HELIXFLOW_POOL_PORT, HELIXFLOW_MODELS=a,b); flags win, then the environment.",
    )
    serve.add_argument("--config", metavar="TOML", help="[serve], [gateway] and [[models]] "
                       "(default: $HELIXFLOW_CONFIG or ./helixflow.toml)")  # fmt: skip
    serve.add_argument("--host", help="gateway address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gateway HTTPS port (default: $PORT or 8443)")
    for flag, what, default in (("--pool-port", "pool gRPC", 50051),
                                ("--auth-port", "auth gRPC", 8081),
                                ("--auth-http-port", "auth HTTP", 8082),
                                ("--monitor-port", "monitoring gRPC", 8083),
                                ("--monitor-http-port", "status page (HTTP)", 8084)):
        env = "HELIXFLOW_" + flag[2:].replace("-", "_").upper()
        serve.add_argument(flag, type=int, help=f"{what} port (default: ${env} or {default})")
    serve.add_argument("--data-dir", help="certificates, database, state (default: "
                       "$HELIXFLOW_DATA_DIR or $HELIXFLOW_HOME/serve)")  # fmt: skip
    serve.add_argument("--model", action="append", dest="models", metavar="NAME|PATH",
                       help="chat model (repeatable; default SmolLM2-135M-Instruct)")  # fmt: skip
    serve.add_argument("--embedding-model", action="append", dest="embedding_models",
                       metavar="NAME|PATH",
                       help="embedding model (default all-MiniLM-L6-v2; none: no embeddings)")
    serve.add_argument("--max-model-len", type=int, help="the pool's context length cap")
    serve.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    serve.set_defaults(handler=_cmd_serve)
    certs = commands.add_parser("certs", help="make the local CA and the TLS certificate")
    certs.add_argument("--dir", help="where (default: $HELIXFLOW_HOME/serve/certs)")
    certs.add_argument("--host", action="append", dest="hosts", metavar="NAME|IP",
                       help="another name the certificate must cover (repeatable)")  # fmt: skip
    certs.add_argument("--force", action="store_true", help="make new ones even if valid")
    certs.set_defaults(handler=_cmd_certs)
    from helixflow.auth.admin import add_admin_arguments

    admin = commands.add_parser(
        "admin",
        help="manage users, API keys, revocations and signing keys",
        description="Work directly on the auth database (the service need not run).",
    )
    add_admin_arguments(admin)
    admin.set_defaults(handler=_cmd_admin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``helixflow`` command line and return its exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0, usage errors 2
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
