"""The configuration of ``helixflow serve``: every port, path and model is a flag, an
environment variable or a key of the ``[serve]`` section of ``helixflow.toml``.

```toml
[serve]                          # every key optional
host = "127.0.0.1"               # the gateway's address
port = 8443                      # the gateway (HTTPS); env PORT or HELIXFLOW_PORT
pool_port = 50051                # the pool's metrics are on pool_port + 1
auth_port = 8081
auth_http_port = 8082
monitor_port = 8083
monitor_http_port = 8084         # the status page
data_dir = "/var/lib/helixflow"  # certificates, auth.db, state.json (default $HELIXFLOW_HOME/serve)
models = ["SmolLM2-135M-Instruct"]         # names of known models, or paths (HF dir, .gguf)
embedding_models = ["all-MiniLM-L6-v2"]    # or ["none"]
max_model_len = 2048
device = "cuda"
```

Each key is also the environment variable ``HELIXFLOW_<KEY>`` (lists comma separated), and
``PORT`` is the gateway's port as for ``helixflow gateway``. Lowest first: defaults, the file
(``--config``, else ``$HELIXFLOW_CONFIG``, else ``./helixflow.toml`` if present), the
environment, flags. The same file's ``[gateway]`` and ``[[models]]`` configure the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from helixflow.config import config_file, read_toml
from helixflow.errors import ConfigError

__all__ = ["ServeConfig", "config_file", "load_serve_config"]

Port = Annotated[int, Meta(ge=1, le=65535)]


class ServeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where each service of a `helixflow serve` listens, what it serves, where it keeps
    its files."""

    host: str = "127.0.0.1"
    port: Port = 8443
    pool_port: Port = 50051
    auth_port: Port = 8081
    auth_http_port: Port = 8082
    monitor_port: Port = 8083
    monitor_http_port: Port = 8084
    data_dir: str | None = None
    models: list[str] = []
    embedding_models: list[str] = []
    max_model_len: Annotated[int, Meta(ge=16)] | None = None
    device: str | None = None

    def data_path(self, env: Mapping[str, str]) -> Path:
        """`data_dir`, else ``$HELIXFLOW_HOME/serve`` (default ``~/.cache/helixflow/serve``)."""
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        home = env.get("HELIXFLOW_HOME")
        base = Path(home).expanduser() if home else Path.home() / ".cache" / "helixflow"
        return base / "serve"

    def pool_args(self) -> list[str]:
        """The flags of `helixflow pool` these settings imply (beyond ports and models)."""
        args = []
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.device:
            args += ["--device", self.device]
        return args


_LISTS = {"models", "embedding_models"}
_INTS = {"port", "pool_port", "auth_port", "auth_http_port", "monitor_port",
         "monitor_http_port", "max_model_len"}  # fmt: skip


def _read_section(path: Path) -> dict[str, Any]:
    section = read_toml(path).get("serve", {})
    if not isinstance(section, dict):
        raise ConfigError(f"config: {path}: [serve] must be a table")
    return section


def load_serve_config(flags: Mapping[str, Any], env: Mapping[str, str], *,
                      config_path: Path | None = None) -> ServeConfig:  # fmt: skip
    """Merge defaults, the file's ``[serve]``, the environment and `flags` (None: not given).
    ConfigError names the key or variable at fault."""
    raw: dict[str, Any] = {} if config_path is None else dict(_read_section(config_path))
    keys = [f.name for f in msgspec.structs.fields(ServeConfig)]
    for key in keys:
        names = (["PORT"] if key == "port" else []) + [f"HELIXFLOW_{key.upper()}"]
        for name in names:
            text = env.get(name)
            if not text:
                continue
            if key in _LISTS:
                raw[key] = [item.strip() for item in text.split(",") if item.strip()]
            elif key in _INTS:
                if not text.strip().isdigit():
                    raise ConfigError(f"{name}: expected a number, got {text!r}")
                raw[key] = int(text)
            else:
                raw[key] = text
    for key, value in flags.items():
        if value is not None:
            raw[key] = value
    try:
        config = msgspec.convert(raw, ServeConfig)
    except msgspec.ValidationError as exc:
        where = f"{config_path} [serve]" if config_path else "serve"
        raise ConfigError(f"config: {where}: {exc}") from None
    used = [config.port, config.pool_port, config.pool_port + 1, config.auth_port,
            config.auth_http_port, config.monitor_port, config.monitor_http_port]  # fmt: skip
    if len(set(used)) != len(used):
        raise ConfigError("serve: two services would share a port (the pool's metrics take "
                          f"pool_port + 1): {used}")  # fmt: skip
    return config
