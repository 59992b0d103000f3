"""The native module, its type stub and the Python reference expose one API."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from helixflow import _native
from helixflow.pool import reference

CLASSES = ["BlockAllocator", "Scheduler", "BatchBuilder", "SchedulerOutput", "UpdateOutput"]
STUB = Path(__file__).resolve().parents[2] / "helixflow" / "_native.pyi"


def _public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def _stub_members() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    return {
        node.name: {
            item.name for item in node.body
            if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")
        }
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }  # fmt: skip


def _instances(core: Any) -> dict[str, object]:
    sched = core.Scheduler(8, 4)
    builder = core.BatchBuilder.for_scheduler(sched)
    sched.add_request(1, [1, 2, 3], max_tokens=2)
    out = sched.schedule()
    builder.build(sched)
    upd = sched.update([5])
    return {"BlockAllocator": sched.allocator, "Scheduler": sched, "BatchBuilder": builder,
            "SchedulerOutput": out, "UpdateOutput": upd}  # fmt: skip


@pytest.mark.parametrize("name", CLASSES)
def test_native_and_reference_objects_have_the_same_public_members(name: str) -> None:
    assert _public(_instances(_native)[name]) == _public(_instances(reference)[name])


@pytest.mark.parametrize("name", CLASSES)
def test_stub_declares_every_native_member(name: str) -> None:
    assert _stub_members()[name] == _public(getattr(_native, name))


def test_module_level_names_match() -> None:
    for name in ["ROOT_HASH", "hash_block_tokens", *CLASSES]:
        assert hasattr(_native, name) and hasattr(reference, name), name
    assert _native.ROOT_HASH == reference.ROOT_HASH
