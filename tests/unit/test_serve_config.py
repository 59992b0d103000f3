"""`helixflow serve`'s options: flags over the environment over helixflow.toml over defaults,
with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from helixflow.errors import ConfigError
from helixflow.gateway.config import load_config
from helixflow.serve_config import ServeConfig, config_file, load_serve_config

NONE = {"port": None, "models": None}


def test_defaults_are_the_documented_ports(tmp_path: Path) -> None:
    config = load_serve_config(NONE, {})
    assert (config.port, config.pool_port, config.auth_port, config.auth_http_port,
            config.monitor_port, config.monitor_http_port) == (8443, 50051, 8081, 8082, 8083,
                                                               8084)  # fmt: skip
    assert config.data_path({"HELIXFLOW_HOME": str(tmp_path)}) == tmp_path / "serve"
    assert config.pool_args() == []


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "helixflow.toml"
    toml.write_text('[serve]\nport = 9443\npool_port = 6000\nmodels = ["a", "b"]\n'
                    'max_model_len = 512\ndevice = "cpu"\ndata_dir = "~/hf"\n'
                    '[gateway]\nbody_timeout = 5.0\n')  # fmt: skip
    config = load_serve_config(NONE, {}, config_path=toml)
    assert (config.port, config.pool_port, config.models) == (9443, 6000, ["a", "b"])
    assert config.pool_args() == ["--max-model-len", "512", "--device", "cpu"]
    assert config.data_path({}) == Path("~/hf").expanduser()
    env = {"PORT": "7443", "HELIXFLOW_POOL_PORT": "6100", "HELIXFLOW_MODELS": "c, d"}
    config = load_serve_config(NONE, env, config_path=toml)
    assert (config.port, config.pool_port, config.models) == (7443, 6100, ["c", "d"])
    config = load_serve_config({"port": 6443, "models": ["e"]}, env, config_path=toml)
    assert (config.port, config.models) == (6443, ["e"])
    # The gateway reads the same file and leaves [serve] to serve.
    assert load_config({}, {}, config_path=str(toml)).body_timeout == 5.0


def test_errors_name_the_key(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("[serve]\nmonitor_port = 70000\n")
    with pytest.raises(ConfigError, match="monitor_port"):
        load_serve_config(NONE, {}, config_path=toml)
    toml.write_text("[serve]\nmodle = 1\n")
    with pytest.raises(ConfigError, match="modle"):
        load_serve_config(NONE, {}, config_path=toml)
    with pytest.raises(ConfigError, match="HELIXFLOW_AUTH_PORT"):
        load_serve_config(NONE, {"HELIXFLOW_AUTH_PORT": "eighty"})
    with pytest.raises(ConfigError, match="share a port"):
        load_serve_config({"port": 50052}, {})  # the pool's metrics port
    toml.write_text("[serve\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_serve_config(NONE, {}, config_path=toml)


def test_which_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_file(None, {}) is None
    (tmp_path / "helixflow.toml").write_text("")
    assert config_file(None, {}) == Path("helixflow.toml")
    assert config_file(None, {"HELIXFLOW_CONFIG": "/etc/hf.toml"}) == Path("/etc/hf.toml")
    assert config_file("x.toml", {"HELIXFLOW_CONFIG": "/etc/hf.toml"}) == Path("x.toml")
    assert isinstance(ServeConfig(), ServeConfig)
