"""Packaging: version, the compiled core and the kernels/ -> helixflow.kernels mapping."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import helixflow


def test_version_matches_installed_metadata() -> None:
    assert helixflow.__version__ == importlib.metadata.version("helixflow")


def test_kernels_import_as_subpackage() -> None:
    kernels = importlib.import_module("helixflow.kernels")
    assert kernels.__name__ == "helixflow.kernels"
    assert Path(kernels.__file__ or "").parent.name == "kernels"


def test_native_exposes_build_info() -> None:
    native = importlib.import_module("helixflow._native")
    assert isinstance(native.__build_info__, str)
    assert "sanitize=" in native.__build_info__
