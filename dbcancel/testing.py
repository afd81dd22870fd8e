"""Helpers for testing code that uses dbcancel."""

from __future__ import annotations

import threading

__all__ = ["FakeClock", "close_watchers"]


class FakeClock:
    """A monotonic clock that moves only when told to; pass it as `Jobs(clock=...)`.

    ```python
    clock = FakeClock()
    jobs = Jobs(engine, Analysis, interval=0.5, clock=clock)
    ...
    clock.advance(0.5)   # the next checkpoint call polls the row
    ```
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current reading, in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by `seconds` (>= 0) and return the new reading."""
        if not seconds >= 0:
            raise ValueError(f"a monotonic clock cannot go back: advance({seconds!r})")
        with self._lock:
            self._now += seconds
            return self._now


def close_watchers(timeout: float = 10.0) -> None:
    """Make this process's runtime close the database connections it keeps while idle, now.

    The runtime thread (the default, watched mode) keeps its connection to a database,
    and on PostgreSQL a LISTEN connection, open for a few seconds after its last job
    there ends. A test suite that drops its test database right after the last test
    (Django's test runner and pytest-django on PostgreSQL do) calls this first, once no
    job runs:

    ```python
    @pytest.fixture(scope="session", autouse=True)
    def _dbcancel_watchers_closed(django_db_setup):
        yield
        dbcancel.testing.close_watchers()
    ```

    The next watched job reopens them. Raises `TimeoutError` when jobs of a database
    still run in this process, or its connections were not closed within `timeout`
    seconds.
    """
    from ._runtime import current_runtime

    rt = current_runtime()
    busy = [] if rt is None else rt.close_idle(timeout)
    if busy:
        raise TimeoutError(
            f"the runtime did not close its connections to {', '.join(busy)} within "
            f"{timeout}s: jobs of those databases still run in this process; let them end first"
        )
