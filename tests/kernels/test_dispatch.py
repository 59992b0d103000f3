"""The dispatch layer: Triton on CUDA, the torch reference elsewhere, HELIXFLOW_KERNELS wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helixflow.kernels as hk
from helixflow.kernels import kv_cache as tri_kv
from helixflow.kernels.reference import kv_cache as ref_kv

ROOT = Path(__file__).resolve().parents[2]


def test_every_op_is_exported_with_the_reference_docstring() -> None:
    for name in hk.__all__:
        fn = getattr(hk, name)
        assert callable(fn), name
        assert fn.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize(
    ("setting", "expected"), [("", "torch"), ("auto", "torch"), ("torch", "torch"),
                              ("triton", "triton"), (" Triton ", "triton")],
)  # fmt: skip
def test_backend_on_cpu(setting: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELIXFLOW_KERNELS", setting)
    assert hk.backend_for(torch.zeros(1)) == expected


def test_unknown_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELIXFLOW_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HELIXFLOW_KERNELS must be one of auto, triton, torch"):
        hk.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)


@pytest.mark.parametrize(("setting", "called"), [("torch", ref_kv), ("triton", tri_kv)])
def test_dispatch_calls_the_chosen_implementation(
    setting: str, called: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for module in (ref_kv, tri_kv):
        original = module.write_kv_cache

        def spy(*args: object, _orig: object = original, _name: str = module.__name__) -> None:
            calls.append(_name)
            _orig(*args)  # type: ignore[operator]

        monkeypatch.setattr(module, "write_kv_cache", spy)
    monkeypatch.setenv("HELIXFLOW_KERNELS", setting)
    cache = torch.zeros(2, 4, 1, 8)
    value_cache = torch.zeros(2, 4, 1, 8)
    kv = torch.ones(1, 1, 8)
    hk.write_kv_cache(kv, kv, cache, value_cache, torch.tensor([5]))
    assert calls == [called.__name__]  # type: ignore[attr-defined]
    assert torch.equal(cache[1, 1, 0], kv[0, 0])


def test_cpu_path_works_without_importing_triton() -> None:
    """The reference path must not need Triton: run it where importing triton fails."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, helixflow.kernels as hk\n"
        "x = torch.ones(2, 8); w = torch.ones(8)\n"
        "print(round(hk.rms_norm(x, w, 1e-6).sum().item(), 3))\n"
        "print(hk.sample(torch.tensor([[0.0, 5.0]]), torch.zeros(1), torch.zeros(1, dtype=torch.int64)).item())\n"  # noqa: E501
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HELIXFLOW_KERNELS",)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["16.0", "1"]


def test_kernel_benchmark_smoke_run() -> None:
    """bench/bench_kernels.py end to end on tiny shapes, so the benchmark cannot rot unseen."""
    if torch.cuda.is_available():
        pytest.skip("the GPU run is the benchmark itself, not a test")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for op in ("paged_decode_attention", "paged_prefill_attention", "rms_norm",
               "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache",
               "sample"):  # fmt: skip
        assert f"| {op}" in done.stdout, op
    assert "baseline: device-to-device copy" in done.stdout
