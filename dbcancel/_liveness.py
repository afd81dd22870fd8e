"""Worker liveness: one row per process in the worker table, beaten by one thread.

A job's row names the process running it (`worker_id`); that process's row in the
worker table carries the heartbeat. A process running 1,000 jobs of any number of
tables in one database therefore writes ONE row per heartbeat period, and
`jobs.reap()` finds a job's worker dead when its row is stale on the database's clock
(a host whose own clock is off changes nothing).

Every way of running a job goes through `jobs.run()`, which joins the heartbeat of its
database before the job starts and leaves it when the job has stopped: threads,
`async with`, the watcher and the inline checkpoints are all covered. The thread beats
only while jobs run, is a daemon, and does not exist in a forked child, which gets a
worker id of its own.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Hashable

from ._random import rng
from .backend import Backend

__all__ = ["DEFAULT_HEARTBEAT", "Heartbeat", "heartbeat_for", "worker_id"]

log = logging.getLogger("dbcancel")

DEFAULT_HEARTBEAT = 10.0
"""Seconds between two beats of a worker process's row, unless `Jobs` says otherwise."""

_JITTER = 0.1


def _new_worker_id() -> str:
    host = socket.gethostname()[:200] or "localhost"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


_worker_id = _new_worker_id()


def worker_id() -> str:
    """This process's worker id, `host:pid:token` (a new token after `fork`)."""
    return _worker_id


class Heartbeat:
    """Beats this process's worker row in one database while jobs of it run here."""

    def __init__(self, backend: Backend, label: str) -> None:
        self._backend = backend
        self._label = label
        self._cond = threading.Condition()
        self._beating = threading.Lock()
        self._periods: Counter[float] = Counter()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._beaten = -math.inf  # monotonic time of the last beat that worked
        self._tried = -math.inf  # ... and of the last one tried, for the schedule
        self.beats = 0
        self.errors = 0

    def join(self, period: float, backend: Backend | None = None) -> str:
        """Count a job that is about to start; return the worker id it runs under.

        The first job of an idle process beats at once, in the caller's thread, so the
        job never names a worker row that is missing or stale (a reap may have removed
        it while the process had nothing to run). Later jobs join without a query.
        `backend` (the job's) is the one the beats go through from now on: every
        backend of one worker key reaches the same database.
        """
        with self._cond:
            if backend is not None:
                # The newest job's: an engine of the app's that is surely in use, not one
                # a finished part of the program may have disposed of.
                self._backend = backend
            self._periods[period] += 1
            fresh = time.monotonic() - self._beaten < period
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"dbcancel-heartbeat[{self._label}]", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        if not fresh:
            try:
                self._beat(fresh_within=period)
            except BaseException:
                self.leave(period)
                raise
        return worker_id()

    def leave(self, period: float) -> None:
        """Count a job that has stopped (or did not start)."""
        with self._cond:
            self._periods[period] -= 1
            if self._periods[period] <= 0:
                del self._periods[period]

    def _beat(self, *, fresh_within: float | None = None) -> None:
        # One beat at a time: jobs starting together in an idle process beat once, and
        # never race each other to insert the row.
        with self._beating:
            started = time.monotonic()
            if fresh_within is not None:
                with self._cond:
                    if started - self._beaten < fresh_within:
                        return
            with self._cond:
                self._tried = started
                period = min(self._periods, default=fresh_within or DEFAULT_HEARTBEAT)
            self._backend.beat_worker(worker_id(), period)
            with self._cond:
                self._beaten = started
                self.beats += 1

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._periods))
                # Never sooner than the shortest period of the jobs running now after the
                # last beat (at most one write per period, however many jobs start), and
                # jittered so that processes started together do not beat in lockstep.
                # A job with a shorter period that joins meanwhile shortens the wait.
                factor = rng.uniform(1.0, 1.0 + _JITTER)
                while self._periods:
                    due = self._tried + min(self._periods) * factor
                    if (remaining := due - time.monotonic()) <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._periods:
                    continue
            try:
                self._beat()
                # Django keeps a connection per thread: give it back between beats.
                self._backend.release()
            except Exception:
                with self._cond:
                    self.errors += 1  # the next try comes a period after this one
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "dbcancel: the heartbeat of %s failed; its jobs look dead to reap() "
                        "once it has failed for longer than stale_after",
                        self._label,
                        exc_info=True,
                    )
                continue
            if self._failing:
                self._failing = False
                log.warning("dbcancel: the heartbeat of %s works again", self._label)


_lock = threading.Lock()
_heartbeats: dict[Hashable, Heartbeat] = {}


def heartbeat_for(backend: Backend, label: str) -> Heartbeat:
    """The heartbeat of `backend`'s database in this process, created on first use."""
    with _lock:
        heartbeat = _heartbeats.get(backend.worker_key)
        if heartbeat is None:
            heartbeat = _heartbeats[backend.worker_key] = Heartbeat(backend, label)
        return heartbeat


def _reset_after_fork() -> None:
    global _lock, _worker_id
    _lock = threading.Lock()
    _worker_id = _new_worker_id()
    _heartbeats.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
