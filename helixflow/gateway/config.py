"""The gateway's configuration: flags and environment, plus the model registry in
``helixflow.toml``.

```toml
[gateway]                       # every key optional; flags and env win over the file
max_body_bytes = 4_194_304
body_timeout = 30.0             # seconds to receive a whole request body
first_token_timeout = 60.0      # seconds for a backend to produce its first token
request_timeout = 600.0         # seconds for a whole request
rate_limit_failure = "open"     # Redis down: "open" admits unlimited, "closed" answers 503
shutdown_timeout = 30.0         # SIGTERM: seconds open requests get to finish

[[models]]
id = "SmolLM2-135M-Instruct"
aliases = ["smol"]
backends = [{ pool = "127.0.0.1:50051" }, { pool = "10.0.0.2:50051" }]

[[models]]
id = "gpt-4o-mini"
backends = [{ openai = "https://api.openai.com/v1", api_key_env = "OPENAI_API_KEY" }]
```

With no ``[[models]]``, the gateway asks the pools named by `INFERENCE_POOL_URL` (comma
separated; default 127.0.0.1:50051) which models they serve and routes each model to every
pool that has it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from helixflow.config import config_file, read_toml
from helixflow.errors import ConfigError

__all__ = ["BackendConfig", "GatewayConfig", "ModelConfig", "load_config"]


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One backend of a model: an inference pool (gRPC ``host:port``) or an upstream
    OpenAI-compatible API (base URL, with its key from the environment)."""

    pool: str | None = None
    openai: str | None = None
    api_key_env: str | None = None
    model: str | None = None  # the upstream's name for the model (default: the model id)
    tls_ca: str | None = None  # a pool served over TLS: the CA to trust
    tls_cert: str | None = None  # a pool requiring mTLS: the gateway's client certificate
    tls_key: str | None = None  # ... and its private key

    def __post_init__(self) -> None:
        if (self.pool is None) == (self.openai is None):
            raise ValueError('a backend is either `pool = "host:port"` or `openai = "URL"`')


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    aliases: list[str] = []
    backends: Annotated[list[BackendConfig], Meta(min_length=1)]


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything the gateway process needs; see `load_config`."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8443
    workers: Annotated[int, Meta(ge=1, le=256)] = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    pool_urls: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:50051"])
    # Pools named by address or found in the registry, served over TLS (mTLS with a pair).
    pool_tls_ca: str | None = None
    pool_tls_cert: str | None = None
    pool_tls_key: str | None = None
    auth_grpc: str = "127.0.0.1:8081"
    auth_tls_ca: str | None = None  # auth serves gRPC over TLS: the CA to trust
    redis_url: str | None = None
    # Route also to the pools registered in Redis (helixflow.discovery); needs redis_url.
    discover_pools: bool = False
    # With Redis down: "open" admits without limits (default), "closed" refuses with 503.
    rate_limit_failure: Literal["open", "closed"] = "open"
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    body_timeout: Annotated[float, Meta(gt=0)] = 30.0
    first_token_timeout: Annotated[float, Meta(gt=0)] = 60.0
    request_timeout: Annotated[float, Meta(gt=0)] = 600.0
    # SIGTERM: seconds open requests get to finish before the workers are killed.
    shutdown_timeout: Annotated[float, Meta(ge=1, le=86_400)] = 30.0
    log_format: str = "text"
    models: list[ModelConfig] = []
    # Tests and benchmarks only: authentication off (never in production; warned loudly).
    insecure_no_auth: bool = False


_FILE_KEYS = {"max_body_bytes", "body_timeout", "first_token_timeout", "request_timeout",
              "workers", "host", "port", "rate_limit_failure", "discover_pools",
              "shutdown_timeout", "pool_tls_ca", "pool_tls_cert", "pool_tls_key",
              "auth_tls_ca"}  # fmt: skip


def _read_file(path: Path) -> dict[str, Any]:
    data = read_toml(path)
    unknown = set(data) - {"gateway", "models", "serve"}  # [serve]: helixflow.serve_config
    if unknown:
        raise ConfigError(f"config: {path}: unknown section(s) {sorted(unknown)}")
    gateway = data.get("gateway", {})
    bad = set(gateway) - _FILE_KEYS
    if bad:
        raise ConfigError(f"config: {path}: unknown [gateway] key(s) {sorted(bad)}")
    return {**gateway, "models": data.get("models", [])}


def load_config(
    flags: Mapping[str, Any], env: Mapping[str, str], *, config_path: str | None = None
) -> GatewayConfig:
    """Merge, lowest first: defaults, the TOML file (`config_path`, else $HELIXFLOW_CONFIG,
    else ./helixflow.toml if present), the environment, flags (None: not given).
    ConfigError names the key at fault."""
    raw: dict[str, Any] = {}
    path = config_file(config_path, env)
    if path is not None:
        raw.update(_read_file(path))
    from_env = {
        "port": env.get("PORT"),
        "tls_cert": env.get("TLS_CERT"),
        "tls_key": env.get("TLS_KEY"),
        "pool_urls": env.get("INFERENCE_POOL_URL"),
        "auth_grpc": env.get("AUTH_SERVICE_GRPC"),
        "redis_url": env.get("REDIS_URL"),
        "rate_limit_failure": env.get("HELIXFLOW_RATE_LIMIT_FAILURE"),
        "discover_pools": {"1": True, "true": True}.get(env.get("HELIXFLOW_DISCOVER_POOLS", "")),
    }
    for key, value in (*from_env.items(), *flags.items()):
        if value is None or value == "":
            continue
        if key == "port":
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"PORT: must be a port number, got {value!r}") from None
        if key == "pool_urls" and isinstance(value, str):
            value = [u.strip() for u in value.split(",") if u.strip()]
        raw[key] = value
    try:
        config = msgspec.convert(raw, GatewayConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {exc}") from None
    if config.discover_pools and not config.redis_url:
        raise ConfigError("discover_pools needs redis_url (--redis-url or REDIS_URL)")
    if config.discover_pools and config.models:
        raise ConfigError("discover_pools routes by the pools' own models: it cannot be "
                          "combined with [[models]]")  # fmt: skip
    if config.discover_pools and "pool_urls" not in raw:
        # NOTE: the default pool address is only a default: with discovery, none is assumed.
        config = msgspec.structs.replace(config, pool_urls=[])
    for option in ("auth_tls_ca", "pool_tls_ca", "pool_tls_cert", "pool_tls_key"):
        path = getattr(config, option)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{option}: no such file {path}")
    if (config.pool_tls_cert is None) != (config.pool_tls_key is None):
        raise ConfigError("pool_tls_cert and pool_tls_key: give both or neither")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("TLS_CERT and TLS_KEY: give both or neither")
    for model in config.models:
        for backend in model.backends:
            if backend.api_key_env and backend.api_key_env not in env:
                raise ConfigError(f"config: model {model.id!r}: {backend.api_key_env} is not set")
    return config
