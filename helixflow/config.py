"""``helixflow.toml``: which file is in use, and reading it.

One file configures a deployment: ``[serve]`` (`helixflow.serve_config`), ``[gateway]`` and
``[[models]]`` (`helixflow.gateway.config`); each reader validates its own sections.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helixflow.errors import ConfigError

__all__ = ["config_file", "read_toml"]


def config_file(flag: str | None, env: Mapping[str, str]) -> Path | None:
    """The ``helixflow.toml`` in use: the flag, else $HELIXFLOW_CONFIG, else ./helixflow.toml."""
    path = flag or env.get("HELIXFLOW_CONFIG")
    if path is None and Path("helixflow.toml").is_file():
        path = "helixflow.toml"
    return None if path is None else Path(path)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; ConfigError naming the file when it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
