"""Real server processes for the tests: free ports, start, wait until ready, stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """``python -m helixflow <args>`` with its output in a log file; `ready()` polls until
    `probe` returns True (or the process dies, or `timeout` passes)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("w")
        # NOTE: its own process group, so that `stop` can reap what it spawned (a gateway's
        # granian workers) even when the service itself had to be killed.
        self.proc = subprocess.Popen([sys.executable, "-m", "helixflow", *args], env=dict(env),
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def ready(self, probe: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helixflow {self.args[0]} exited early:\n"
                                   f"{self.log.read_text()[-4000:]}")  # fmt: skip
            try:
                if probe():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"helixflow {self.args[0]} did not come up:\n"
                                   f"{self.log.read_text()[-4000:]}")  # fmt: skip
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; returns the exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its group still running
        self._log_file.close()
        return int(self.proc.returncode)


class RedisServer:
    """A private ``redis-server`` on a free port (no persistence)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
