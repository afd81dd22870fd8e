"""What one process knows about its polls of one job table: counters and outages.

One `Health` per table (backend key) per process, shared by every `Jobs` of that
table, its checkpoints and its watcher, so that an outage is logged once per table, not
once per running job, and `jobs.stats()` can report it. Reset after `fork`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Hashable
from typing import Any

from . import _events

__all__ = ["Health", "health_for"]

log = logging.getLogger("dbcancel")


class Health:
    """Poll counters and the current outage of one table in this process."""

    def __init__(self, label: str, table: str | None = None) -> None:
        self.table = label if table is None else table  # what metrics label it with
        self._reset(label)
        _every.add(self)

    def _reset(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.polls = 0
        self.poll_errors = 0
        self.notifications = 0
        self.listener_errors = 0
        self._outage_since: float | None = None
        self._outage_errors = 0
        self.last_outage: float | None = None

    def succeeded(self) -> None:
        """Count a status query that worked; ends (and logs the end of) an outage."""
        with self._lock:
            self.polls += 1
            since, self._outage_since = self._outage_since, None
            errors, self._outage_errors = self._outage_errors, 0
            if since is not None:
                self.last_outage = time.monotonic() - since
        if _events.on:
            _events.emit(
                "poll", self.table, ok=True, outage=None if since is None else self.last_outage
            )
        if since is not None:
            log.warning(
                "dbcancel: polling %s works again after %.1fs (%d failed polls)",
                self.label,
                self.last_outage,
                errors,
            )

    def failed(self, job_id: Any = None) -> None:
        """Count a status query that raised; logs, with the exception, once per outage.

        Call it from the `except` block, so that the log record carries the exception.
        """
        with self._lock:
            self.polls += 1
            self.poll_errors += 1
            self._outage_errors += 1
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
        if _events.on:
            _events.emit("poll", self.table, ok=False, outage=None)
        if first:
            which = "" if job_id is None else f" (job {job_id!r})"
            log.warning(
                "dbcancel: polling %s failed%s; retrying with backoff while running jobs go on",
                self.label,
                which,
                exc_info=True,
            )

    def snapshot(self) -> tuple[int, int, int, int, float | None]:
        """Polls, poll errors, notifications, listener errors and the last outage's
        length, read together."""
        with self._lock:
            return (
                self.polls,
                self.poll_errors,
                self.notifications,
                self.listener_errors,
                self.last_outage,
            )

    def outage(self) -> float | None:
        """Seconds since the first failed poll of the current outage; None when polls work."""
        with self._lock:
            since = self._outage_since
        return None if since is None else time.monotonic() - since

    def count(self, *, notifications: int = 0, listener_errors: int = 0) -> None:
        """Add to the watcher's counters."""
        with self._lock:
            self.notifications += notifications
            self.listener_errors += listener_errors
        if notifications and _events.on:
            _events.emit("notification", self.table, count=notifications)


_lock = threading.Lock()
_by_key: dict[Hashable, Health] = {}
_every: weakref.WeakSet[Health] = weakref.WeakSet()


def health_for(key: Hashable, label: str, table: str | None = None) -> Health:
    """The `Health` of the table identified by `key` in this process (`table`: its
    name, for metrics)."""
    with _lock:
        health = _by_key.get(key)
        if health is None:
            health = _by_key[key] = Health(label, table)
        return health


def _reset_after_fork() -> None:
    # A lock held by a parent's thread at the fork would stay held in the child forever;
    # the parent's counters are not the child's either.
    # The same objects stay registered, so that Jobs made before and after the fork
    # share one per table.
    global _lock
    _lock = threading.Lock()
    for health in list(_every):
        health._reset(health.label)


os.register_at_fork(after_in_child=_reset_after_fork)
