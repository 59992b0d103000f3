"""Logging set-up shared by the services: plain text for people, JSON lines for collectors.

A record's ``request_id`` (``log.info(..., extra={"request_id": rid})``) becomes a field of its
JSON object, and is appended as ``[request_id]`` in text.
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["configure_logging"]

_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, request_id, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} [{request_id}]"


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Route the root logger to stderr in ``fmt`` ("text" or "json")."""
    if fmt not in _FORMATS:
        raise ValueError(f"log format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
