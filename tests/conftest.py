"""Shared pytest configuration for every test suite under tests/.

The real-model fixtures pull SmolLM2-135M-Instruct and all-MiniLM-L6-v2 once per session into
``$HELIXFLOW_TEST_MODEL_CACHE`` when set (CI keeps it between runs), else into a session
temporary directory. Tests that corrupt or delete cache entries work on their own copy under
``tmp_path``, never on this shared cache. NOTE: helixflow.pool.models (torch) is imported inside the
fixtures, so suites that do not use them (the sanitizer run of tests/native) need no torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from helixflow.pool.models.loader import LoadedModel

SMOLLM = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HELIXFLOW_HOME whose cache holds both known models."""
    cached = os.environ.get("HELIXFLOW_TEST_MODEL_CACHE")
    home = Path(cached) if cached else tmp_path_factory.mktemp("helixflow_home")
    from helixflow.pool.models import hub

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELIXFLOW_HOME", str(home))
        for name in (SMOLLM, MINILM):
            hub.pull(name, quiet=True)
    return home


@pytest.fixture
def use_home(model_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HELIXFLOW_HOME at the shared, already pulled cache for one test."""
    monkeypatch.setenv("HELIXFLOW_HOME", str(model_home))
    return model_home


@pytest.fixture(scope="session")
def smollm_path(model_home: Path) -> Path:
    return model_home / "models" / SMOLLM / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_path(model_home: Path) -> Path:
    return model_home / "models" / MINILM


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct's files, read (config, tokenizer, lazy weights)."""
    from helixflow.pool.models.loader import load_model_files

    return load_model_files(smollm_path)


@pytest.fixture(scope="session")
def minilm(minilm_path: Path) -> LoadedModel:
    """all-MiniLM-L6-v2's files, read."""
    from helixflow.pool.models.loader import load_model_files

    return load_model_files(minilm_path)


@pytest.fixture(scope="session")
def transformers_offline() -> Iterator[Any]:
    """The transformers package, never reaching for the Hub."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_VERBOSITY", "error")
        yield pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def platform_stack(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One pool + auth (tests/gateway/stack_testing.py `Stack`) shared by the suites that drive
    the platform through gateways (gateway, client, security): each module starts its own
    gateway(s) and keys on it, so none sees another's traffic in its gateway's log. Starting
    the pool once instead of per module saves CI minutes."""
    from gateway.stack_testing import Stack

    stack = Stack(model_home, tmp_path_factory.mktemp("platform"))
    try:
        yield stack
    finally:
        stack.close()
