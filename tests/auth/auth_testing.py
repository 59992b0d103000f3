"""Shared pieces of the auth tests: a fixed start time and a settable clock."""

from __future__ import annotations

T0 = 1_800_000_000.0


class Clock:
    """A settable clock: call it for the time, `advance` to move it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
