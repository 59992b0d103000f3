"""bench/bench_engine.py end to end on a tiny workload, so the benchmark cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_engine_benchmark_smoke_run(
    use_home: Path, transformers_offline: Any, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("the GPU run is the benchmark itself, not a test")
    out = tmp_path / "figures.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for method in ("| helixflow |", "| hf sequential |", "| hf batch 2 |"):
        assert method in done.stdout, method
    assert "HelixFlow >= 10x HF sequential" in done.stdout
    assert "| batch | decode tok/s |" in done.stdout  # the GPU section's code, on a tiny model
    figures = json.loads(out.read_text())
    methods = {m["method"]: m for m in figures["vs_transformers"]["methods"]}
    assert methods["helixflow"]["output_tokens"] == 4 * 4  # 4 prompts x 4 tokens, EOS masked
    assert methods["hf sequential"]["output_tokens"] == 2 * 4
    # Greedy on identical weights: unpadded HF agrees with HelixFlow token for token.
    assert figures["vs_transformers"]["correctness"]["hf sequential"]["identical"] == 2
