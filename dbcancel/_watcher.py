"""One background watcher per process and job table (the default, watched mode).

The watcher polls every job of its table running in this process with ONE statement per
interval, through the same poll step as a threadless checkpoint
(`dbcancel.checkpoint.poll_step`), and feeds the rows to their checkpoints: flags
flip and `on_cancel` callbacks run in the watcher's thread, even while the workers are
blocked in I/O. It also polls the threadless checkpoints that asyncio code registers for
the length of a block (`dbcancel.media`), so that no event loop waits on the database.
On PostgreSQL it waits between polls on a LISTEN connection and polls at once when a
cancel of one of its jobs is announced.

The thread starts with the first watched job, idles (no queries, and after a grace
period no listener connection) while none run, is a daemon (it never keeps the
interpreter alive), and does not exist in a forked child: the child's first watched job
starts the child's own.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Collection, Hashable
from typing import Any

from ._health import Health
from ._random import rng
from .backend import Backend, Listener, read_cancel_payload, row_text
from .checkpoint import MAX_BACKOFF, Checkpoint, Rows, backoff, poll_step

__all__ = ["Watcher", "watcher_for"]

log = logging.getLogger("dbcancel")

JITTER = 0.1
"""Each wait between polls is the interval times a random factor in [1 - J, 1 + J], so
that processes started together do not poll in lockstep."""

IDLE_GRACE = 5.0
"""Seconds without watched jobs after which the listener connection is closed."""

LISTEN_SLICE = 0.5
"""Longest single wait on the listener connection: between two, the thread checks
whether a job with a shorter interval than the current wait's has arrived."""


class Watcher:
    """Polls (and heartbeats) the watched checkpoints of one table in this process."""

    def __init__(self, backend: Backend, health: Health) -> None:
        self._backend = backend
        self._health = health
        self._cond = threading.Condition()
        # Each checkpoint with the number of holders that asked for it (a run, and an
        # asyncio block inside it, say): it is polled until the last one leaves.
        self._watched: dict[Checkpoint, int] = {}
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = _listener_of(backend)
        self._listener_failing = False
        self._reconnect_at = 0.0
        self._listen_failures = 0
        self._failures = 0
        self._kick = False
        # The interval the current wait was planned for, and whether a job with a
        # shorter one has arrived since (the wait is then cut to that interval).
        self._planned = math.inf
        self._shorter = False
        # Set by close_idle(): an idle thread closes its connections now, not after
        # the grace period, and clears it.
        self._closing = False

    # -- used by JobRun ---------------------------------------------------------------

    def add(self, cp: Checkpoint) -> None:
        """Watch `cp` from the next poll on; starts the thread if it is not running.

        The next poll comes at the end of the current wait, cut short to `cp`'s
        interval when that is shorter than the one the wait was planned for (within
        `LISTEN_SLICE` while listening). A cancel issued in this process needs no
        poll.
        """
        with self._cond:
            self._watched[cp] = self._watched.get(cp, 0) + 1
            if cp.interval < self._planned:
                self._shorter = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run,
                    name=f"dbcancel-watcher[{self._health.label}]",
                    daemon=True,
                )
                self._thread.start()
            self._cond.notify_all()

    def remove(self, cp: Checkpoint) -> None:
        """Drop one hold on `cp`; it stops being polled when the last one is dropped.

        Harmless when it is not watched.
        """
        with self._cond:
            count = self._watched.pop(cp, 0) - 1
            if count > 0:
                self._watched[cp] = count
            elif not self._watched:
                # The last job left: end the wait, so that the thread idles (and gives
                # back its database connection) now rather than at the end of it.
                self._kick = True
                self._cond.notify_all()

    def close_idle(self, timeout: float) -> bool:
        """Make the thread close its connections now if it watches nothing; True once
        it has (or when it is not running), False when jobs are watched or `timeout`
        seconds pass first."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return True
            if self._watched:
                return False
            self._closing = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: not self._closing or bool(self._watched), timeout)
            return done and not self._watched

    def poll_soon(self) -> None:
        """Make the thread poll now instead of at the end of its current wait."""
        with self._cond:
            self._kick = True
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def listening(self) -> bool:
        """True while the PostgreSQL listener connection is open."""
        listener = self._listener
        return listener is not None and listener.connected

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                interval = self._wait_for_jobs()
                self._wait(self._next_delay(interval))
                self._poll()
            except Exception:  # a bug must not end the watcher silently, nor spin
                log.exception("dbcancel: the watcher of %s failed; going on", self._health.label)
                time.sleep(1.0)

    def _wait_for_jobs(self) -> float:
        """Block while nothing is watched; return the smallest interval of those that are.

        Idle, the thread gives back its database connection at once and closes its
        listener after `IDLE_GRACE` seconds (at once when `close_idle` asks).
        """
        with self._cond:
            grace = True
            while not self._watched:
                if grace:
                    self._release()
                    self._cond.wait_for(
                        lambda: bool(self._watched) or self._closing, timeout=IDLE_GRACE
                    )
                    grace = False
                else:
                    self._cond.wait_for(lambda: bool(self._watched) or self._closing)
                if not self._watched:
                    self._idle()
                    self._closing = False
                    self._cond.notify_all()
            self._planned = min(cp.interval for cp in self._watched)
            self._shorter = False
            return self._planned

    def _idle(self) -> None:
        """Give back what the thread holds while no job runs: the listener connection,
        and its own connection to the database (the Django backend's; SQLAlchemy's
        return to the pool after each poll). The next watched job reopens them."""
        if self._listener is not None:
            self._listener.close()
        self._release()

    def _release(self) -> None:
        try:
            self._backend.release()
        except Exception:  # a broken connection is as good as closed
            log.debug("dbcancel: closing the watcher's connection failed", exc_info=True)

    def _next_delay(self, interval: float) -> float:
        if not self._failures:
            return interval * rng.uniform(1 - JITTER, 1 + JITTER)
        with self._cond:
            stale_in = min((cp._stale_in() for cp in self._watched), default=math.inf)
        return max(0.0, min(backoff(interval, self._failures), stale_in))

    def _wait(self, delay: float) -> None:
        """Sleep `delay` seconds, or less when a cancel of a watched job is announced.

        With a listener, the wait is on its connection; while that is down, on the
        condition, waking to reconnect when the next attempt is due.
        """
        started = time.monotonic()
        deadline = started + delay
        listener = self._listener
        while (remaining := deadline - time.monotonic()) > 0:
            shorter = self._take_shorter()
            if shorter is not None:
                deadline = min(deadline, started + shorter)
                continue
            if listener is not None and self._listen(listener):
                if self._take_kick():
                    return
                try:
                    payloads = listener.wait(min(remaining, LISTEN_SLICE))
                except Exception:
                    self._listen_failed(listener)
                    continue
                if payloads:
                    self._health.count(notifications=len(payloads))
                    if self._take_notifications(payloads):
                        return
                continue
            until = deadline if listener is None else min(deadline, self._reconnect_at)
            with self._cond:
                self._cond.wait_for(
                    lambda: self._kick or self._shorter,
                    timeout=max(0.0, until - time.monotonic()),
                )
            if self._take_kick():
                return

    def _take_shorter(self) -> float | None:
        """The shortest interval watched, when a job with a shorter interval than the
        current wait's has arrived since the last look; else None."""
        with self._cond:
            if not self._shorter:
                return None
            self._shorter = False
            self._planned = min((cp.interval for cp in self._watched), default=math.inf)
            return self._planned

    def _take_kick(self) -> bool:
        with self._cond:
            kicked, self._kick = self._kick, False
        return kicked

    def _listen(self, listener: Listener) -> bool:
        """Connect the listener if it is down and a retry is due; True when it is up."""
        if self.listening:
            return True
        if time.monotonic() < self._reconnect_at:
            return False
        try:
            listener.connect()
        except Exception:
            self._listen_failed(listener)
            return False
        if self._listener_failing:
            self._listener_failing = False
            log.warning("dbcancel: listening for cancels of %s again", self._health.label)
        # A cancel committed before LISTEN took effect was announced to nobody: poll now,
        # after every connect (the first one too, or a cancel right after the first job
        # started would wait a whole interval).
        self.poll_soon()
        self._listen_failures = 0
        return True

    def _listen_failed(self, listener: Listener) -> None:
        listener.close()
        self._health.count(listener_errors=1)
        self._listen_failures += 1
        self._reconnect_at = time.monotonic() + min(
            0.1 * 2.0 ** (self._listen_failures - 1), MAX_BACKOFF
        )
        if not self._listener_failing:
            self._listener_failing = True
            log.warning(
                "dbcancel: listening for cancels of %s failed; polling alone until it reconnects",
                self._health.label,
                exc_info=True,
            )

    def _take_notifications(self, payloads: list[str]) -> bool:
        """Cancel the watched jobs the payloads name; True when a poll must follow.

        A payload is sent only by a committed cancel that changed the row, so one that
        names a job and its reason flips the checkpoint at once: no confirming poll, no
        second hand-off of the GIL. `"*"` (`cancel_where`) and a bare id (from an
        older dbcancel) ask for a poll.
        """
        with self._cond:
            by_id: dict[str, list[Checkpoint]] = {}
            for cp in self._watched:
                by_id.setdefault(str(cp.job_id), []).append(cp)
        poll = False
        for payload in payloads:
            named = read_cancel_payload(payload)
            if named is None:
                poll = True
                continue
            job_id, reason, exact = named
            for cp in by_id.get(job_id, ()):
                if exact:
                    cp._observe(reason)
                else:
                    poll = True
        return poll

    def _poll(self) -> None:
        with self._cond:
            cps = list(self._watched)
        if not cps:
            return
        try:
            poll_step(self._read, self._health, cps, still_polled=self._still_watched)
        except Exception:
            self._failures += 1
            return
        self._failures = 0

    def _read(self, job_ids: Collection[Any]) -> Rows:
        # The thread keeps its connection between polls (the Django backend's one
        # connection of this thread): a dead one is replaced by the backend's read.
        rows = self._backend.read_many(job_ids)
        return {job_id: (row.status, row_text(row)) for job_id, row in rows.items()}

    def _still_watched(self, cp: Checkpoint) -> bool:
        # A job that left meanwhile may have had its row deleted since.
        with self._cond:
            return cp in self._watched


def _listener_of(backend: Backend) -> Listener | None:
    """The backend's listener; None (poll only) when its driver cannot listen.

    `Jobs(watch=True)` asks the backend first and so refuses such an engine; the
    default watched mode polls it without complaint.
    """
    try:
        return backend.listener()
    except TypeError:
        log.debug("dbcancel: %s cannot listen for cancels; polling only", backend.label)
        return None


_lock = threading.Lock()
_watchers: dict[Hashable, Watcher] = {}
# Watchers inherited from the parent by a forked child: their threads do not exist in
# the child, and their listener connection is the parent's. Kept referenced so that it is
# never finalized (closed) from the child.
_orphans: list[Watcher] = []


def watcher_for(key: Hashable, backend: Backend, health: Health) -> Watcher:
    """The watcher of the table `key` in this process, created on first use."""
    with _lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = _watchers[key] = Watcher(backend, health)
        return watcher


def close_idle_watchers(timeout: float) -> list[str]:
    """Make every idle watcher of this process close its connections now; the labels
    of those that still watch jobs, or did not manage within `timeout` seconds."""
    with _lock:
        watchers = list(_watchers.values())
    deadline = time.monotonic() + timeout
    return [
        w._health.label for w in watchers if not w.close_idle(max(0.0, deadline - time.monotonic()))
    ]


def existing_watcher(key: Hashable) -> Watcher | None:
    """The watcher of the table `key` if this process has one."""
    with _lock:
        return _watchers.get(key)


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _orphans.extend(_watchers.values())
    _watchers.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
