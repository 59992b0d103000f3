"""Fixtures for tests/native: every test runs on ``helixflow._native`` and on the pure-Python
reference ``helixflow.pool.reference`` (the specification) through the ``core`` fixture."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import pytest

_MODULES = {"native": "helixflow._native", "reference": "helixflow.pool.reference"}


@pytest.fixture(params=list(_MODULES), ids=list(_MODULES))
def core(request: pytest.FixtureRequest) -> ModuleType:
    """The implementation under test: ``helixflow._native`` or ``helixflow.pool.reference``."""
    return importlib.import_module(_MODULES[request.param])


def _step(sched: Any, tokens: int | Sequence[int] = 7) -> tuple[Any, Any]:
    """``schedule()`` then ``update()``: ``tokens`` is one id for every row, or the list."""
    out = sched.schedule()
    sampled = [tokens] * out.num_reqs if isinstance(tokens, int) else list(tokens)
    return out, sched.update(sampled)


def _rows(out: Any) -> list[tuple[int, int, int]]:
    """A SchedulerOutput's rows as ``(req_id, num_scheduled_tokens, num_computed_tokens)``."""
    return list(
        zip(
            out.req_ids.tolist(),
            out.num_scheduled_tokens.tolist(),
            out.num_computed_tokens.tolist(),
            strict=True,
        )
    )


@pytest.fixture
def step() -> Callable[..., tuple[Any, Any]]:
    """``step(sched, tokens=7) -> (SchedulerOutput, UpdateOutput)``."""
    return _step


@pytest.fixture
def rows() -> Callable[[Any], list[tuple[int, int, int]]]:
    """``rows(scheduler_output) -> [(req_id, num_scheduled, num_computed), ...]``."""
    return _rows
