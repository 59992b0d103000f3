"""The committed gRPC code is exactly what protos/ generates (protos/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    f"{name}{suffix}"
    for name in ("inference", "auth", "monitoring")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Ihelixflow/_proto=protos",
           f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
           "protos/inference.proto", "protos/auth.proto", "protos/monitoring.proto"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "helixflow" / "_proto" / name).read_text()
        committed = (ROOT / "helixflow" / "_proto" / name).read_text()
        assert fresh == committed, f"helixflow/_proto/{name} is stale: regenerate it"
