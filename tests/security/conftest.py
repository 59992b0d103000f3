"""The security modules drive the session's shared platform (`platform_stack`, tests/conftest.py):
each starts what else it needs (its own gateway(s), keys) on top of it."""

from __future__ import annotations

import pytest
from security_testing import Stack


@pytest.fixture(scope="session")
def security_stack(platform_stack: Stack) -> Stack:
    return platform_stack
