"""``helixflow serve`` as a user meets it: one command, a printed key and examples that work as
printed, a crashed pool restarted by the supervisor, a clean stop, and a second start that
keeps what the first made."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from process_testing import free_port


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text()
        if text in content:
            return content
        assert proc.poll() is None, f"serve exited early:\n{content[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{content[-4000:]}"
        time.sleep(0.2)


def test_serve_end_to_end(model_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ports = [free_port() for _ in range(4)]
    args = [sys.executable, "-m", "helixflow", "serve", "--data-dir", str(data),
            "--port", str(ports[0]), "--pool-port", str(ports[1]), "--auth-port", str(ports[2]),
            "--auth-http-port", str(ports[3]), "--max-model-len", "1024"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "REDIS_URL")}
    env["HELIXFLOW_HOME"] = str(model_home)
    out = tmp_path / "serve.log"
    files = [out.open("w")]
    proc = subprocess.Popen(args, env=env, stdout=files[-1], stderr=subprocess.STDOUT)
    try:
        log = _wait_for(out, "HelixFlow is up", proc, 180)
        key = re.search(r"API key:\s+(hfx_\S+)", log)
        assert key is not None, log[-2000:]
        ca = data / "certs" / "ca.pem"
        assert oct((data / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
        # The printed openai-SDK example works as printed.
        example = log[log.index("python - <<'EOF'\n") + len("python - <<'EOF'\n") :]
        example = example[: example.index("\nEOF\n")]
        ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
        url = f"https://localhost:{ports[0]}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as http:
            reply = http.post(f"{url}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {key.group(1)}"},
                              json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                                    "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]

            # A crashed pool is restarted, and the gateway is ready again.
            state = json.loads((data / "state.json").read_text())
            os.kill(state["pool"]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                state = json.loads((data / "state.json").read_text())
                if state["pool"]["restarts"] == 1 and http.get(f"{url}/ready").status_code == 200:
                    break
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.25)
        pids = [entry["pid"] for entry in state.values()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, out.read_text()[-3000:]
        assert "stopped: {'auth': 0, 'pool': 0, 'gateway': 0}" in out.read_text()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text()  # fmt: skip

        # A second start keeps the database: no new admin, the first key still works.
        files.append(out.open("w"))
        proc = subprocess.Popen(args, env=env, stdout=files[-1], stderr=subprocess.STDOUT)
        log = _wait_for(out, "HelixFlow is up", proc, 180)
        assert "API key:" not in log and "the one printed on the first start" in log
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as http:
            models = http.get(f"{url}/v1/models",
                              headers={"Authorization": f"Bearer {key.group(1)}"})  # fmt: skip
            assert models.status_code == 200
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for file in files:
            file.close()
