"""Helpers for testing code that uses dbcancel."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock that moves only when told to; pass it as ``Jobs(clock=...)``.

    ::

        clock = FakeClock()
        jobs = Jobs(engine, Analysis, interval=0.5, clock=clock)
        ...
        clock.advance(0.5)   # the next checkpoint call polls the row
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current reading, in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new reading."""
        if not seconds >= 0:
            raise ValueError(f"a monotonic clock cannot go back: advance({seconds!r})")
        with self._lock:
            self._now += seconds
            return self._now
