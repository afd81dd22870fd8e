"""The jobs running in this process, so that a local cancel reaches them at once.

One private, lock-protected registry per process, keyed by the backend's key (database and
table) and job id. `jobs.run()` adds an entry on enter and removes it on exit, so the
registry holds exactly the jobs running now, never finished ones. After `fork` the child
starts with an empty registry: the parent's threads do not exist there.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .models import JobId

__all__ = ["ActiveJob"]


@dataclass(frozen=True, slots=True)
class ActiveJob:
    """A job running in this process, as listed by `jobs.active()`."""

    job_id: JobId
    """The job's id."""
    checkpoint: Checkpoint = field(repr=False)
    """The job's checkpoint (`.cancelled`, `.reason`, `.on_cancel`)."""
    thread: threading.Thread
    """The thread that entered `jobs.run()`."""
    started_at: dt.datetime
    """When it entered `jobs.run()` (aware UTC)."""


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Hashable, dict[Any, list[ActiveJob]]] = {}

    def add(self, key: Hashable, entry: ActiveJob) -> None:
        with self._lock:
            self._jobs.setdefault(key, {}).setdefault(entry.job_id, []).append(entry)

    def remove(self, key: Hashable, entry: ActiveJob) -> None:
        with self._lock:
            table = self._jobs.get(key)
            if table is None:
                return
            entries = table.get(entry.job_id)
            if entries is None or entry not in entries:
                return
            entries.remove(entry)
            # Empty containers go too: the registry's size follows the running jobs only.
            if not entries:
                del table[entry.job_id]
                if not table:
                    del self._jobs[key]

    def active(self, key: Hashable) -> tuple[ActiveJob, ...]:
        with self._lock:
            table = self._jobs.get(key, {})
            return tuple(e for entries in table.values() for e in entries)

    def checkpoints(self, key: Hashable, job_id: Any) -> tuple[Checkpoint, ...]:
        with self._lock:
            entries = self._jobs.get(key, {}).get(job_id, ())
            return tuple(e.checkpoint for e in entries)

    def everything(self) -> list[tuple[Hashable, ActiveJob]]:
        """Every job running in this process, with its table's key."""
        with self._lock:
            return [
                (key, e)
                for key, table in self._jobs.items()
                for entries in table.values()
                for e in entries
            ]

    def size(self) -> int:
        with self._lock:
            return sum(len(e) for table in self._jobs.values() for e in table.values())

    def _reset_after_fork(self) -> None:
        # The parent's jobs do not run here: a checkpoint of theirs that the child
        # still holds (a worker forked inside a job) raises on use from now on.
        parent = os.getppid()
        for table in self._jobs.values():
            for entries in table.values():
                for entry in entries:
                    entry.checkpoint._orphaned(parent)
        self._lock = threading.Lock()
        self._jobs = {}


registry = _Registry()
os.register_at_fork(after_in_child=registry._reset_after_fork)
