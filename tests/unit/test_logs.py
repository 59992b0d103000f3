"""Service log lines: text with the request id, or one JSON object per line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from helixflow.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    log = logging.getLogger("helixflow.test")
    log.info("generated %d tokens", 5, extra={"request_id": "r-1"})
    log.warning("plain")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["msg"] == "generated 5 tokens" and first["request_id"] == "r-1"
    assert first["level"] == "info" and first["logger"] == "helixflow.test"
    assert first["ts"].endswith("Z") and "request_id" not in second


def test_text_lines_append_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text")
    logging.getLogger("helixflow.test").info("done", extra={"request_id": "abc"})
    assert capsys.readouterr().err.rstrip().endswith("done [abc]")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
