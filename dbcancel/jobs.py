"""``Jobs``: request, run and wait for cancellable jobs stored in one table."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from numbers import Real
from types import TracebackType
from typing import Any, Self

from ._health import health_for
from ._liveness import DEFAULT_HEARTBEAT, heartbeat_for
from ._watcher import Watcher, existing_watcher, watcher_for
from .backend import (
    WORKER_LOST,
    Backend,
    JobRow,
    cancel_change,
    check_backend,
    complete_change,
    cut_reason,
    fail_change,
    row_text,
    start_change,
    utcnow,
)
from .checkpoint import Checkpoint, _pop, _push
from .errors import Cancelled, InvalidTransition, JobNotFound
from .models import Status
from .registry import ActiveJob, registry

__all__ = ["JobRun", "Jobs", "JobsStats"]

log = logging.getLogger("dbcancel")


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


def check_options(
    *,
    interval: Any,
    clock: Any,
    watch: Any,
    max_staleness: Any,
) -> tuple[float, float | None]:
    """Validate the options of :class:`Jobs`; return ``interval`` and ``max_staleness``
    as floats. Shared with the integrations, which build their ``Jobs`` later."""
    seconds = _check_seconds("interval", interval)
    if clock is not None and not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
    if watch is not None and not isinstance(watch, bool):
        raise TypeError(f"watch must be None, True or False, got {watch!r}")
    if watch and clock is not None:
        raise ValueError(
            "Jobs(watch=True) polls from a background thread on real time; a custom "
            "clock applies only to watch=False (use watch=False, or leave watch out, in "
            "tests that drive the clock)"
        )
    staleness = None if max_staleness is None else _check_seconds("max_staleness", max_staleness)
    return seconds, staleness


def watched_mode(watch: bool | None, clock: Callable[[], float] | None) -> bool:
    """The mode ``watch`` stands for: None is watched unless a custom clock is given
    (a clock the caller drives cannot drive a background thread)."""
    return clock is None if watch is None else watch


@dataclass(frozen=True, slots=True)
class JobsStats:
    """What this process has done for one job table, from :meth:`Jobs.stats`.

    Counters cover every ``Jobs`` of the table in this process since it started (or
    forked), checkpoints and watcher together.
    """

    active_jobs: int
    """Jobs of the table running in this process now."""
    watching: bool
    """True while a watcher thread serves the table in this process."""
    listening: bool
    """True while the watcher's PostgreSQL LISTEN connection is open."""
    polls: int
    """Status queries made (by checkpoints and by the watcher; one per batch)."""
    poll_errors: int
    """Status queries that failed."""
    notifications: int
    """PostgreSQL notifications the watcher received."""
    listener_errors: int
    """Times the listener connection failed to connect or broke."""
    outage: float | None
    """Seconds since the first failed poll of the current outage; None when polls work."""
    last_outage: float | None
    """How long the last outage that ended lasted, in seconds; None if there was none."""
    heartbeats: int = 0
    """Beats of this process's worker row in the table's database (shared by every
    table there)."""
    heartbeat_errors: int = 0
    """Beats of the worker row that failed (each is logged once per outage)."""


class Jobs:
    """Cancel, run and wait for the jobs of one table.

    ::

        jobs = Jobs(engine, Analysis, interval=0.5)
        with jobs.run(analysis_id) as cp:     # in the worker
            for path in files:
                cp()
                process(path)

        jobs.cancel(analysis_id, where={"user_id": uid})   # anywhere, any process

    ``bind`` is an Engine or a sessionmaker bound to one; ``model`` a mapped class using
    :class:`dbcancel.CancellableMixin` (or a Table with the same columns). ``interval`` is
    the number of seconds of ``clock`` (default :func:`time.monotonic`) between two polls
    of a running job's row. Every status change is one conditional UPDATE, committed
    before the method returns.

    The watched mode (the default): one background watcher per process and table polls
    every running job of the table in one statement per interval, listens for cancel
    notifications on PostgreSQL (with psycopg 3; other drivers are polled), and ``cp()``
    only reads a flag. It polls on real time, so a custom ``clock`` makes the default
    threadless. ``watch=False``, the threadless mode: each ``cp()`` reads the clock and
    polls its own row when a poll is due (for tests driven by a fake clock, and servers
    that forbid threads). ``watch=True`` insists on the watched mode: it refuses a custom
    clock, and a PostgreSQL engine it cannot listen through. ``max_staleness``: seconds
    without a successful poll after which a running job is cancelled locally (fail
    closed); by default a database outage never stops a job (fail open).
    """

    def __init__(
        self,
        bind: Any,
        model: Any,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        from ._sqla import SQLAlchemyBackend  # raises naming the extra when it is missing

        self._setup(
            SQLAlchemyBackend(bind, model),
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
        )

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] | None = None,
        watch: bool = False,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> Self:
        """A ``Jobs`` on ``backend``, an implementation of :class:`dbcancel.backend.Backend`.

        ::

            jobs = Jobs.from_backend(MyBackend(connection_factory, "analysis"))

        For an ORM or driver dbcancel does not ship a backend for; the options are those
        of :class:`Jobs`, and every method works as it does there. ``Jobs(engine,
        Model)`` is ``Jobs.from_backend`` on dbcancel's SQLAlchemy backend, and
        :class:`~dbcancel.contrib.django.DjangoJobs` on its Django one. Raises
        :class:`TypeError` naming the members ``backend`` lacks.
        """
        jobs = cls.__new__(cls)
        jobs._setup(
            backend,
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
        )
        return jobs

    def _setup(
        self,
        backend: Backend,
        *,
        interval: float,
        clock: Callable[[], float] | None,
        watch: bool | None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        """What every way of building a ``Jobs`` shares: check the options, keep the backend."""
        check_backend(backend)
        self._interval, self._max_staleness = check_options(
            interval=interval, clock=clock, watch=watch, max_staleness=max_staleness
        )
        self._heartbeat_period = _check_seconds("heartbeat", heartbeat)
        if watch:
            backend.listener()  # refuses a PostgreSQL engine it could not listen through
        self._watch = watched_mode(watch, clock)
        self._clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self._backend = backend
        self._health = health_for(backend.key, backend.label)

    # -- properties -------------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Seconds between two polls of a running job's row."""
        return self._interval

    @property
    def watch(self) -> bool:
        """The mode in effect: True when a shared background watcher polls the running
        jobs (the default), False when each checkpoint polls its own row."""
        return self._watch

    @property
    def heartbeat(self) -> float:
        """Seconds between two beats of this process's worker row while jobs run."""
        return self._heartbeat_period

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a successful poll after which running jobs are cancelled
        locally; None when they keep running through an outage."""
        return self._max_staleness

    @property
    def model_name(self) -> str:
        """The name of the job model, as used in error messages."""
        return self._backend.model_name

    def __repr__(self) -> str:
        watch = "" if self._watch else " watch=False"
        return f"<Jobs {self.model_name} interval={self._interval}{watch}>"

    # -- requesting -------------------------------------------------------------------

    def cancel(
        self, job_id: Any, *, reason: str | None = None, where: Mapping[str, Any] | None = None
    ) -> bool:
        """Cancel a pending or running job; durable when this returns.

        Returns True when the job is cancelled, by this call or before; False when it had
        already completed or failed (nothing changed). ``where`` maps columns to values
        the row must also have (``{"user_id": uid}``): a row that does not match, or does
        not exist, raises :class:`JobNotFound` and nothing changes. Checkpoints of the job
        running in this process see the cancel at once and run their callbacks.
        """
        b = self._backend
        b.check_id(job_id)
        b.check_filters(where)
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None, got {reason!r}")
        reason = cut_reason(reason)
        if not b.apply(cancel_change(reason), job_id=job_id, filters=where):
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
        """Cancel every pending or running job matching ``filters``; return how many.

        ``jobs.cancel_where(user_id=uid, session_id=sid)``. At least one filter is
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
        local = registry.active(b.key)
        if count and local:
            rows = b.read_many({e.job_id for e in local})
            for entry in local:
                row = rows.get(entry.job_id)
                if row is None or row.status is Status.CANCELLED:
                    entry.checkpoint._observe(None if row is None else row.cancel_reason)
        return count

    def status(self, job_id: Any) -> Status:
        """The job's current status, read from the database."""
        self._backend.check_id(job_id)
        return self._read(job_id).status

    def wait(self, job_id: Any, timeout: float | None = None) -> Status:
        """Block until the job has stopped (``finished_at`` set); return its final status.

        Raises :class:`TimeoutError` when ``timeout`` seconds pass first and
        :class:`JobNotFound` when the row does not exist. A job running in this process
        is waited for without polling.
        """
        b = self._backend
        b.check_id(job_id)
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            row = self._read(job_id)
            if row.finished_at is not None:
                return row.status
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{b.model_name} {job_id!r} has not stopped after {timeout}s "
                    f"(status {row.status.value!r})"
                )
            local = registry.checkpoints(b.key, job_id)
            if local:
                # Running here: its run() sets this event after recording how it ended.
                local[0]._wait_ended(min(remaining, self._interval))
            else:
                time.sleep(min(remaining, delay))
                delay = min(delay * 2, self._interval)

    # -- running ----------------------------------------------------------------------

    def run(self, job_id: Any, *, where: Mapping[str, Any] | None = None) -> JobRun:
        """Run a job: a context manager (``with`` or ``async with``) yielding its Checkpoint.

        On enter: pending → in_progress. A job already cancelled yields a checkpoint
        that is already cancelled; a missing row raises :class:`JobNotFound`; a job in
        any other state raises :class:`InvalidTransition`. On exit: in_progress →
        completed, unless it was cancelled meanwhile (then it stays cancelled); a
        ``Cancelled`` of this job is swallowed; any other exception marks it failed and
        propagates. Every exit of a run that started the job stamps ``finished_at``; a
        run that found the job already cancelled writes nothing (its first worker, if
        any, is the one that says when it has stopped).
        """
        self._backend.check_id(job_id)
        self._backend.check_filters(where)
        return JobRun(self, job_id, where)

    def active(self) -> tuple[ActiveJob, ...]:
        """The jobs of this table running in this process now."""
        return registry.active(self._backend.key)

    # -- recovery and observability ---------------------------------------------------

    def reap(self, stale_after: float) -> int:
        """Stop the jobs whose worker is gone; return how many.

        A job's worker is gone when the job has not stopped (``finished_at`` null) and
        the worker process's row has not beaten for ``stale_after`` seconds, or is
        missing. Every process running jobs beats its row every ``heartbeat`` seconds,
        in every way of running them (threads, ``async with``, ``watch=True``), and
        both ages are measured on the database's clock, so a host whose clock is off
        changes nothing. Choose ``stale_after`` as at least three heartbeat periods.

        Jobs in progress become failed with the error ``"worker lost"``; cancelled jobs
        whose worker never stopped stay cancelled. Both get ``finished_at``, so
        :meth:`wait` and cancel-then-delete flows return. One conditional UPDATE. A
        worker that was only stalled (stopped, swapped out) and comes back finds its
        job no longer in progress: it stops at its next checkpoint and writes nothing.
        Rows started by dbcancel 0.1 (no ``worker_id``) are judged by their own
        ``heartbeat_at``, or ``started_at``.
        """
        seconds = _check_seconds("stale_after", stale_after)
        count = self._backend.reap(seconds, WORKER_LOST)
        if count:
            log.warning(
                "dbcancel: reaped %d %s job(s) without a heartbeat for %gs",
                count,
                self.model_name,
                seconds,
            )
        return count

    def stats(self) -> JobsStats:
        """Counters and state of this process's polling of this table; see JobsStats."""
        h = self._health
        watcher = existing_watcher(self._backend.key)
        polls, errors, notifications, listener_errors, last_outage = h.snapshot()
        beat = heartbeat_for(self._backend, self._backend.label)
        return JobsStats(
            active_jobs=len(self.active()),
            watching=watcher is not None and watcher.running,
            listening=watcher is not None and watcher.listening,
            polls=polls,
            poll_errors=errors,
            notifications=notifications,
            listener_errors=listener_errors,
            outage=h.outage(),
            last_outage=last_outage,
            heartbeats=beat.beats,
            heartbeat_errors=beat.errors,
        )

    # -- used by checkpoints and JobRun -----------------------------------------------

    def _read(self, job_id: Any, where: Mapping[str, Any] | None = None) -> JobRow:
        row = self._backend.read(job_id, where)
        if row is None:
            raise JobNotFound(self._backend.model_name, job_id, dict(where) if where else None)
        return row

    def _poll_row(self, job_id: Any) -> tuple[Status | None, str | None]:
        """The job's status and what the row says of it (see :func:`row_text`)."""
        row = self._backend.read(job_id)
        return (None, None) if row is None else (row.status, row_text(row))

    def _poll_rows(self, job_ids: Collection[Any]) -> dict[Any, tuple[Status, str | None]]:
        """The status and row text of those jobs that still exist, in one query: what
        a threadless checkpoint's poll reads, in the worker's thread."""
        rows = self._backend.read_many(job_ids)
        return {job_id: (row.status, row_text(row)) for job_id, row in rows.items()}

    def _complete_in(self, job_id: Any, using: Any) -> tuple[Status | None, str | None] | None:
        if self._backend.apply(complete_change(), job_id=job_id, using=using):
            return None
        status, text = self._poll_row(job_id)
        if status is Status.COMPLETED:  # by this worker, in an earlier transaction
            raise InvalidTransition(self.model_name, job_id, status.value, status.value)
        return status, text

    def _start(
        self, job_id: Any, where: Mapping[str, Any] | None, *, in_executor: bool = False
    ) -> tuple[Checkpoint, bool]:
        """Move the job to in_progress; return its checkpoint and whether this call did it.

        The thread releases its hold on the database when the start fails (no exit will
        follow) or runs in an executor (``async with``: the worker is elsewhere); a
        synchronous worker keeps its connection for its polls.
        """
        entered = False
        try:
            result = self._start_job(job_id, where)
            entered = True
            return result
        finally:
            if in_executor or not entered:
                self._backend.release()

    def _start_job(self, job_id: Any, where: Mapping[str, Any] | None) -> tuple[Checkpoint, bool]:
        b = self._backend
        started, reason = True, None
        # Before the job names this process as its worker, the process's row must be
        # there and fresh; the job leaves the heartbeat once it has stopped.
        heartbeat = heartbeat_for(b, b.label)
        worker = heartbeat.join(self._heartbeat_period, b)
        try:
            if not b.apply(start_change(worker), job_id=job_id, filters=where):
                started = False
                row = self._read(job_id, where)
                if row.status is not Status.CANCELLED:
                    raise InvalidTransition(
                        b.model_name, job_id, row.status.value, Status.IN_PROGRESS.value
                    )
                reason = row.cancel_reason
        finally:
            if not started:
                heartbeat.leave(self._heartbeat_period)
        cp = Checkpoint(
            self,
            job_id,
            interval=self._interval,
            clock=self._clock,
            key=b.key,
            cancelled=not started,
            reason=reason,
            watched=self._watch,
            max_staleness=self._max_staleness,
            health=self._health,
        )
        return cp, started

    def _watcher(self) -> Watcher:
        b = self._backend
        return watcher_for(b.key, b, self._health)

    def _finish(self, cp: Checkpoint, exc: BaseException | None, started: bool) -> bool:
        """Record how the job ended; True when ``exc`` is to be swallowed.

        A run that found its job already cancelled (``started`` False) writes nothing: the
        job may still have a worker elsewhere (a cancelled duplicate delivery), and only
        that worker may say it has stopped. The thread then releases its hold on the
        database: the run is over.
        """
        try:
            return self._finish_job(cp, exc, started)
        except Exception as err:
            if started:
                # The database refused twice (the write was retried on a fresh
                # connection): say what the row now wrongly shows, and what settles it.
                ended = "completed" if exc is None else type(exc).__name__
                err.add_note(
                    f"dbcancel: {self.model_name} {cp.job_id!r} ended ({ended}) but its "
                    "row could not be updated; it shows the status it had before until "
                    "jobs.reap() finds its heartbeat stale"
                )
            raise
        finally:
            if started:
                heartbeat_for(self._backend, self._backend.label).leave(self._heartbeat_period)
            self._backend.release()

    def _finish_job(self, cp: Checkpoint, exc: BaseException | None, started: bool) -> bool:
        b = self._backend
        job_id = cp.job_id
        own_cancel = isinstance(exc, Cancelled) and _is_own(exc, cp, b.key)
        if not started:
            return own_cancel
        if exc is None:
            if b.apply(complete_change(), job_id=job_id):
                return False
            # Not in progress any more: completed through cp.complete(), cancelled or
            # deleted meanwhile, or fenced (reaped, changed by hand). Never completed
            # after any of those; the checkpoint takes note of which it was.
            cp._apply_row(*self._poll_row(job_id))
            b.mark_stopped(job_id, cp._seen_at())
            return False
        if own_cancel:
            assert isinstance(exc, Cancelled)
            if cp._decided_here:
                self._finish_local_cancel(cp)
                return True
            if not cp.cancelled:
                # Raised by the worker itself: make the row say so.
                reason = cut_reason(exc.reason)
                b.apply(cancel_change(reason), job_id=job_id)
                cp._observe(reason)
            b.mark_stopped(job_id, cp._seen_at())
            return True
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not b.apply(fail_change(text), job_id=job_id):
            b.mark_stopped(job_id, cp._seen_at())
        return False

    def _finish_local_cancel(self, cp: Checkpoint) -> None:
        """Record a job cancelled in this process because its polls kept failing.

        The database is probably still down: a write that fails is logged, not raised,
        so the worker stops as asked; the row then stays in progress until
        :meth:`reap` finds its heartbeat stale.
        """
        b = self._backend
        try:
            b.apply(cancel_change(cp.reason), job_id=cp.job_id)
            b.mark_stopped(cp.job_id, cp._seen_at())
        except Exception:
            log.error(
                "dbcancel: %s %r stopped after %s, but its row could not be updated; "
                "it stays %r until jobs.reap() finds its heartbeat stale",
                b.model_name,
                cp.job_id,
                cp.reason,
                Status.IN_PROGRESS.value,
                exc_info=True,
            )


def _is_own(exc: Cancelled, cp: Checkpoint, key: Any) -> bool:
    exc_key = getattr(exc, "_dbcancel_key", None)
    return bool(exc.job_id == cp.job_id and (exc_key is None or exc_key == key))


class JobRun:
    """The context manager returned by :meth:`Jobs.run`; yields the job's Checkpoint.

    Usable once, with ``with`` in a thread or process, or ``async with`` in a task (the
    database round trips of enter and exit then run in a worker thread).
    """

    __slots__ = ("_cp", "_entry", "_job_id", "_jobs", "_started", "_watcher", "_where")

    def __init__(self, jobs: Jobs, job_id: Any, where: Mapping[str, Any] | None) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._where = dict(where) if where else None
        self._cp: Checkpoint | None = None
        self._entry: ActiveJob | None = None
        self._started = False
        self._watcher: Watcher | None = None

    def _enter(self, cp: Checkpoint, started: bool) -> Checkpoint:
        self._cp = cp
        self._started = started
        self._entry = ActiveJob(cp.job_id, cp, threading.current_thread(), utcnow())
        registry.add(self._jobs._backend.key, self._entry)
        if cp.watched and started:
            self._watcher = self._jobs._watcher()
            self._watcher.add(cp)
        _push(cp)
        return cp

    def _unwatch(self) -> None:
        # Before the final write: once the job has stopped, the row may be deleted (the
        # cancel-then-delete flow), and the watcher must not report that to a finished job.
        if self._watcher is not None:
            assert self._cp is not None
            self._watcher.remove(self._cp)
            self._watcher = None

    def _leave(self) -> None:
        assert self._cp is not None
        assert self._entry is not None
        _pop(self._cp)
        self._unwatch()
        registry.remove(self._jobs._backend.key, self._entry)
        self._cp._ended()

    def __enter__(self) -> Checkpoint:
        if self._cp is not None:
            raise RuntimeError("a JobRun can be entered only once; call jobs.run() again")
        return self._enter(*self._jobs._start(self._job_id, self._where))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._cp is not None
        self._unwatch()
        try:
            return self._jobs._finish(self._cp, exc, self._started)
        finally:
            self._leave()

    async def __aenter__(self) -> Checkpoint:
        if self._cp is not None:
            raise RuntimeError("a JobRun can be entered only once; call jobs.run() again")
        cp, started = await asyncio.to_thread(
            functools.partial(self._jobs._start, self._job_id, self._where, in_executor=True)
        )
        return self._enter(cp, started)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._cp is not None
        self._unwatch()
        try:
            return await asyncio.to_thread(self._jobs._finish, self._cp, exc, self._started)
        finally:
            self._leave()
