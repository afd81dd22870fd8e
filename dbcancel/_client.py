"""The client side of [`Jobs`][dbcancel.Jobs]: what any process does to a job's row.

Cancel, look at and wait for jobs, and settle those whose worker is gone. Nothing here
runs a job: a web process that only requests and cancels uses this side alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, TypeVar

from . import _events
from ._aio import MAX_WAIT_POLL, LoopEvent, check_timeout, wait_stopped
from ._events import table_of
from ._runtime import runtime
from .backend import WORKER_LOST, Backend, JobRow, cancel_change, cut_reason
from .errors import JobNotFound
from .models import JobId, Status
from .registry import registry

__all__ = ["MAX_WAIT_POLL", "JobsClient", "check_seconds"]


log = logging.getLogger("dbcancel")

_T = TypeVar("_T")


def check_seconds(name: str, value: Any) -> float:
    """`value` as a finite number of seconds > 0; TypeError or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


class JobsClient:
    """Requesting and recovery: the methods of [`Jobs`][dbcancel.Jobs] that change or read
    a job's row from outside its worker (any thread, any process)."""

    _backend: Backend
    _interval: float

    @property
    def model_name(self) -> str:
        """The name of the job model, as used in error messages."""
        return self._backend.model_name

    # -- requesting -------------------------------------------------------------------

    def cancel(
        self, job_id: JobId, *, reason: str | None = None, where: Mapping[str, Any] | None = None
    ) -> bool:
        """Cancel a pending or running job; durable when this returns.

        Returns True when the job is cancelled, by this call or before; False when it had
        already completed or failed (nothing changed). `where` maps columns to values
        the row must also have (`{"user_id": uid}`): a row that does not match, or does
        not exist, raises [`JobNotFound`][dbcancel.JobNotFound] and nothing changes.
        Checkpoints of the job running in this process see the cancel at once and run their
        callbacks.
        """
        b = self._backend
        b.check_id(job_id)
        b.check_filters(where)
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None, got {reason!r}")
        reason = cut_reason(reason)
        applied = b.apply(cancel_change(reason), job_id=job_id, filters=where)
        if applied and _events.on:
            _events.emit("cancel", table_of(b), count=1)
        if not applied:
            row = b.read(job_id, where)
            if row is None:
                raise JobNotFound(b.model_name, job_id, dict(where) if where else None)
            if row.status is not Status.CANCELLED:
                return False
            reason = row.cancel_reason
        for cp in registry.checkpoints(b.key, job_id):
            cp._observe(reason)
        return True

    def cancel_where(self, **filters: Any) -> int:
        """Cancel every pending or running job matching `filters`; return how many.

        `jobs.cancel_where(user_id=uid, session_id=sid)`. At least one filter is
        required, so that a forgotten argument cannot cancel the whole table.
        """
        b = self._backend
        if not filters:
            raise ValueError(
                f"cancel_where() needs at least one column filter for {b.model_name}, "
                "e.g. cancel_where(session_id=...); nothing was changed"
            )
        b.check_filters(filters)
        count = b.apply(cancel_change(None), filters=filters)
        if count and _events.on:
            _events.emit("cancel", table_of(b), count=count)
        local = registry.active(b.key)
        if count and local:
            rows = b.read_many({e.job_id for e in local})
            for entry in local:
                row = rows.get(entry.job_id)
                if row is None or row.status is Status.CANCELLED:
                    entry.checkpoint._observe(None if row is None else row.cancel_reason)
        return count

    def status(self, job_id: JobId) -> Status:
        """The job's current status, read from the database."""
        self._backend.check_id(job_id)
        return self._read(job_id, changing=False).status

    def wait(self, job_id: JobId, timeout: float | None = None) -> Status:
        """Block until the job has stopped (`finished_at` set); return its final status.

        Raises `TimeoutError` when `timeout` seconds pass first and
        [`JobNotFound`][dbcancel.JobNotFound] when the row does not exist. A job running in
        this process is waited for without polling, and until its worker has left `run()`: a
        row stamped by `reap()` while that worker still runs here is not enough.
        """
        b = self._backend
        b.check_id(job_id)
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        # Polling backs off to at most the interval, and at most a second: elsewhere
        # than on PostgreSQL nothing announces a job's end. On PostgreSQL the runtime
        # thread listens for the end (and cancel) notifications of the table, and wakes
        # this wait at once; the polls are then only the safety net.
        ceiling = min(self._interval, MAX_WAIT_POLL)
        delay = min(0.005, ceiling)
        with runtime().waiting(b, job_id) as woken:
            while True:
                if woken is not None:
                    woken.clear()
                row = self._read(job_id, changing=False)
                remaining = math.inf if deadline is None else deadline - time.monotonic()
                if row.finished_at is not None:
                    # The run of the job in this process has written its end but may
                    # still be leaving run(): return once it has left, so that what the
                    # caller does next (delete the job's files) never overlaps any part
                    # of the worker.
                    bound = None if deadline is None else max(remaining, 0.0)
                    for cp in registry.checkpoints(b.key, job_id):
                        if cp._leaving() and not cp._wait_ended(bound):
                            break
                    else:
                        return row.status
                if remaining <= 0:
                    raise TimeoutError(
                        f"{b.model_name} {job_id!r} has not stopped after {timeout}s "
                        f"(status {row.status.value!r})"
                    )
                local = registry.checkpoints(b.key, job_id)
                if local:
                    # Running here: its run() sets this event after recording how it ended.
                    local[0]._wait_ended(min(remaining, self._interval))
                elif woken is not None:
                    woken.wait(min(remaining, delay))
                    delay = min(delay * 2, ceiling)
                else:
                    time.sleep(min(remaining, delay))
                    delay = min(delay * 2, ceiling)

    # -- awaitable, for asyncio code -------------------------------------------------

    async def _offload(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """`fn(*args, **kwargs)` in a thread of the loop's executor, which then gives
        back what the ORM keeps per thread (Django's connection)."""
        backend = self._backend

        def call() -> _T:
            try:
                return fn(*args, **kwargs)
            finally:
                backend.release()

        return await asyncio.to_thread(call)

    async def acancel(
        self, job_id: JobId, *, reason: str | None = None, where: Mapping[str, Any] | None = None
    ) -> bool:
        """[`cancel`][dbcancel.Jobs.cancel], awaitable: its round trips run in a thread of
        the loop's executor, so the loop goes on meanwhile."""
        return await self._offload(self.cancel, job_id, reason=reason, where=where)

    async def acancel_where(self, **filters: Any) -> int:
        """[`cancel_where`][dbcancel.Jobs.cancel_where], awaitable (in an executor thread)."""
        return await self._offload(self.cancel_where, **filters)

    async def astatus(self, job_id: JobId) -> Status:
        """[`status`][dbcancel.Jobs.status], awaitable (in an executor thread)."""
        return await self._offload(self.status, job_id)

    async def await_(self, job_id: JobId, timeout: float | None = None) -> Status:
        """[`wait`][dbcancel.Jobs.wait], awaitable: the `a`-prefixed name of `wait` is
        the keyword `await`, hence the trailing underscore.

        No thread waits: the pauses are awaited on the loop, a job running in this
        process is awaited through its run's end, the rows of every job awaited on
        the loop are read together (one statement per table, `min(interval, 1 s)`
        apart, in an executor thread for its round trip only), and on PostgreSQL
        (psycopg 3) the runtime thread's listener wakes this coroutine when the job's
        end is announced.
        """
        from ._aio_runtime import loop_runtime

        b = self._backend
        b.check_id(job_id)
        check_timeout(timeout)
        loop = asyncio.get_running_loop()

        async def read() -> JobRow:
            return await self._offload(self._read, job_id)

        async def read_many(job_ids: Any) -> Mapping[Any, JobRow]:
            return await self._offload(b.read_many, job_ids)

        key = await self._offload(lambda: b.key)
        every = min(self._interval, MAX_WAIT_POLL)
        # Notifications arrive through the runtime thread's listener (PostgreSQL); the
        # loop's runtime reads the waited rows of this table together, in a thread.
        with runtime().waiting(b, job_id, LoopEvent(loop)) as pushed:
            async with loop_runtime().waiting(
                b,
                job_id,
                reader=read_many,
                every=every,
                event=pushed,
                listen=False,
                bridged=False,
            ) as woken:
                return await wait_stopped(
                    read,
                    key=key,
                    job_id=job_id,
                    model_name=b.model_name,
                    timeout=timeout,
                    interval=self._interval,
                    woken=woken,
                )

    # -- recovery and observability ---------------------------------------------------

    def reap(self, stale_after: float) -> int:
        """Stop the jobs whose worker is gone; return how many.

        Every process running jobs beats its row of the worker table every
        `heartbeat` seconds (the shortest of its running jobs'), in every way of
        running them (threads, `async with`, `watch=True`), and each beat records
        until when the process counts as alive: [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS]
        (3) of its periods later. A job that has not stopped (`finished_at` null) has
        lost its worker when the worker's row is missing, or when its last beat is
        older than `max(stale_after, 3 * that worker's period)`: `stale_after` is a
        floor: a reaper with a short one never fails the jobs of a live worker with a
        longer period, and a long one makes every worker wait at least that long.
        Every age is measured on the database's clock, so a host whose clock is off
        changes nothing. Worker rows that predate the record (a worker table not yet
        migrated, see the operations guide) are judged by `stale_after` alone: there,
        choose it as at least three heartbeat periods.

        Jobs in progress become failed with the error `"worker lost"`; cancelled jobs
        whose worker never stopped stay cancelled. Both get `finished_at`, so
        [`wait`][dbcancel.Jobs.wait] and cancel-then-delete flows return. One conditional UPDATE. A
        worker that was only stalled (stopped, swapped out) and comes back finds its
        job no longer in progress: it stops at its next checkpoint and writes nothing.
        Rows started by dbcancel 0.1 (no `worker_id`) are judged by their own
        `heartbeat_at`, or `started_at`, against `stale_after` alone.
        """
        seconds = check_seconds("stale_after", stale_after)
        count = self._backend.reap(seconds, WORKER_LOST)
        if count and _events.on:
            _events.emit("reap", table_of(self._backend), count=count)
        if count:
            log.warning(
                "dbcancel: reaped %d %s job(s) whose worker stopped beating "
                "(stale_after %gs, or three of its own periods if longer)",
                count,
                self.model_name,
                seconds,
            )
        return count

    # -- shared with the worker side --------------------------------------------------

    def _read(
        self, job_id: Any, where: Mapping[str, Any] | None = None, *, changing: bool = True
    ) -> JobRow:
        """The job's row, or [`JobNotFound`][dbcancel.JobNotFound] (`changing`: whether
        the caller meant to change it, so that the error says nothing was)."""
        row = self._backend.read(job_id, where)
        if row is None:
            filters = dict(where) if where else None
            raise JobNotFound(self._backend.model_name, job_id, filters, changing=changing)
        return row
