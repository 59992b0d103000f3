"""A real headless browser for page tests: Debian's Chromium (``/usr/bin/chromium``, or
``$HELIXFLOW_CHROMIUM``) driven by Playwright.

Without either the test is skipped, unless ``HELIXFLOW_REQUIRE_BROWSER=1`` (CI sets it), where a
missing browser fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# NOTE: without the background-networking flags Chromium keeps trying to reach Google's
# services, which a closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def _unavailable(why: str) -> None:
    if os.environ.get("HELIXFLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a browser is required here: {why}")
    pytest.skip(why)


@contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A fresh page in a fresh headless Chromium profile."""
    executable = os.environ.get("HELIXFLOW_CHROMIUM") or shutil.which("chromium")
    if not executable:
        _unavailable("no chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            profile, executable_path=executable, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
