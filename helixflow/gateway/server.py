"""``helixflow gateway``: granian serving the gateway's ASGI app (uvloop, HTTP/1.1 and HTTP/2,
TLS 1.3 as the minimum).

The parent process validates the configuration (so a bad file or flag fails at once with a
message naming the key), then hands it to granian's workers in the environment
(`HELIXFLOW_GATEWAY_CONFIG`, JSON); each worker builds its app from it (`create_app`).
Without a certificate the gateway speaks plain HTTP and says so in a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from helixflow.errors import ConfigError
from helixflow.gateway.app import Gateway
from helixflow.gateway.config import GatewayConfig

__all__ = ["create_app", "run"]

log = logging.getLogger("helixflow.gateway")

CONFIG_ENV = "HELIXFLOW_GATEWAY_CONFIG"
HEADER_READ_TIMEOUT_MS = 10_000


def create_app() -> Gateway:
    """The app of one granian worker, from the configuration its parent validated."""
    from helixflow.logs import configure_logging

    text = os.environ.get(CONFIG_ENV)
    if text is None:
        raise ConfigError(f"{CONFIG_ENV} is not set: start the gateway with `helixflow gateway`")
    config = msgspec.json.decode(text, type=GatewayConfig)
    configure_logging(config.log_format)
    # NOTE: the formats use no caller, thread or process fields; skipping their lookup saves
    # a stack walk per log line (one access line per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return Gateway(config, dict(os.environ))


def run(config: GatewayConfig) -> int:
    """Serve until SIGTERM/SIGINT (granian drains in-flight requests); returns 0."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops, SSLProtocols
    from granian.http import HTTP1Settings

    for name in ("tls_cert", "tls_key"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{name.upper()}: cannot read {path}")
    if config.tls_cert is None:
        log.warning("no TLS certificate (TLS_CERT/TLS_KEY): serving PLAIN HTTP on %s:%d; use "
                    "this only behind a TLS-terminating proxy or for local tests",
                    config.host, config.port)  # fmt: skip
    if config.insecure_no_auth:
        log.warning("AUTHENTICATION IS OFF (--insecure-no-auth)")
    os.environ[CONFIG_ENV] = msgspec.json.encode(config).decode()
    tls: dict[str, Any] = {}
    if config.tls_cert and config.tls_key:
        tls = {"ssl_cert": Path(config.tls_cert), "ssl_key": Path(config.tls_key),
               "ssl_protocol_min": SSLProtocols.tls13}  # fmt: skip
    server = Granian(
        "helixflow.gateway.server:create_app", address=config.host, port=config.port,
        interface=Interfaces.ASGI, workers=config.workers, loop=Loops.uvloop,
        http=HTTPModes.auto, factory=True, log_enabled=False, backlog=2048,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS),
        respawn_failed_workers=True,
        workers_kill_timeout=max(1, int(config.shutdown_timeout)), **tls,
    )  # fmt: skip
    scheme = "https" if tls else "http"
    print(f"helixflow gateway: {scheme}://{config.host}:{config.port} "
          f"({config.workers} worker{'s' if config.workers > 1 else ''})", flush=True)  # fmt: skip
    server.serve()
    return 0
