"""Kernel tests: every Triton kernel against its torch reference.

Without a GPU the kernels run in Triton's CPU interpreter. ``triton.jit`` decides at decoration
time whether to interpret, so ``TRITON_INTERPRET`` is set here, before any kernel module is
imported. With a GPU (and no ``TRITON_INTERPRET``) the same tests run on CUDA under the ``gpu``
marker.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    # NOTE: before the first `import triton`, which reads its settings from the environment.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytest.importorskip("numpy")


@pytest.fixture(
    params=[pytest.param("cuda", marks=pytest.mark.gpu)] if ON_GPU else ["cpu"],
)
def device(request: pytest.FixtureRequest) -> str:
    """Where the kernels run: CUDA with a GPU, else the CPU under the Triton interpreter."""
    return str(request.param)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A seeded torch generator; the seed is derived from the test id and printed."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
