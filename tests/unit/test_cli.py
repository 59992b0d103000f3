"""The ``helixflow`` command line, run as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helixflow


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # NOTE: run outside the source tree so the installed package is what gets imported.
    return subprocess.run(
        [sys.executable, "-m", "helixflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: helixflow" in result.stdout
    assert "info" in result.stdout


def test_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"helixflow {helixflow.__version__}"


def test_no_command_prints_help_and_fails(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: helixflow" in result.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("no-such-command", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_info_reports_versions_and_native_build(tmp_path: Path) -> None:
    result = run_cli("info", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert lines["helixflow"] == helixflow.__version__
    assert lines["python"].startswith(".".join(map(str, sys.version_info[:3])))
    assert lines["native"].startswith("ok ("), lines["native"]
    assert "sanitize=" in lines["native"]
    assert {"torch", "triton", "numpy"} <= lines.keys()
