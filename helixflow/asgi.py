"""What the ASGI apps of the services share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["accept_lifespan"]


async def accept_lifespan(receive: Callable[[], Awaitable[dict[str, Any]]],
                          send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:  # fmt: skip
    """Answer an ASGI lifespan scope for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
