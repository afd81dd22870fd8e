"""The worker side of [`Jobs`][dbcancel.Jobs]: running a job and its checkpoint.

`jobs.run()` moves the job to in_progress, joins the process's heartbeat, hands the
checkpoint to the watcher (in the watched mode), and records how the job ended. It
builds on the client side only to read rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from types import TracebackType
from typing import Any, TypeVar

from . import _events, _timeouts
from ._client import JobsClient
from ._health import Health
from ._runtime import runtime
from .backend import (
    cancel_change,
    complete_change,
    cut_reason,
    fail_change,
    retry_change,
    row_text,
    start_change,
    utcnow,
)
from .checkpoint import Checkpoint, _pop, _push
from .errors import Cancelled, InvalidTransition
from .models import JobId, Status
from .registry import ActiveJob, registry

__all__ = ["JobRun", "JobsWorker", "error_text"]

log = logging.getLogger("dbcancel")

_T = TypeVar("_T")


class JobsWorker(JobsClient):
    """Running: the methods of [`Jobs`][dbcancel.Jobs] that a worker calls, and what its
    checkpoints and [`JobRun`][dbcancel.JobRun] call back into."""

    _clock: Callable[[], float]
    _watch: bool
    _max_staleness: float | None
    _heartbeat_period: float
    _health: Health

    # -- running ----------------------------------------------------------------------

    def run(self, job_id: JobId, *, where: Mapping[str, Any] | None = None) -> JobRun:
        """Run a job: a context manager (`with` or `async with`) yielding its Checkpoint.

        On enter: pending → in_progress. A job already cancelled raises
        [`Cancelled`][dbcancel.Cancelled] from the `with` (or `async with`) statement
        itself: the body never runs and nothing is written (its first worker, if any, is
        the one that says when it has stopped); catch it around the statement where a
        cancelled job is an expected outcome. A missing row raises
        [`JobNotFound`][dbcancel.JobNotFound]; a job in any other state raises
        [`InvalidTransition`][dbcancel.InvalidTransition]. On exit: in_progress → completed,
        unless it was cancelled meanwhile (then it stays cancelled); a `Cancelled` of this
        job raised inside the block is swallowed; any other exception marks it failed and
        propagates. Every exit of a run that started the job stamps `finished_at`.
        """
        self._backend.check_id(job_id)
        self._backend.check_filters(where)
        return JobRun(self, job_id, where)

    def active(self) -> tuple[ActiveJob, ...]:
        """The jobs of this table running in this process now."""
        return registry.active(self._backend.key)

    # -- used by checkpoints and JobRun -----------------------------------------------

    def _poll_row(self, job_id: Any) -> tuple[Status | None, str | None]:
        """The job's status and what the row says of it (see
        [`row_text`][dbcancel.backend.row_text])."""
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

    def _retry(self, cp: Checkpoint, error: str) -> bool:
        """Move the running job of `cp` back to pending: its body asked its task queue
        for a retry, and `error` says why. True when the row is pending now; False, with
        nothing changed, when the job was cancelled meanwhile (the cancel wins: `cp`
        takes note, and the retry must not run) or left `in_progress` another way.

        The run's exit then writes nothing: the next delivery starts the job again.
        """
        if cp._retried:
            return True
        if cp.cancelled:
            return False
        cp._retried = True  # before the write: a poll must not take pending for a fence
        try:
            if self._backend.apply(retry_change(error), job_id=cp.job_id):
                return True
        except BaseException:
            cp._retried = False
            raise
        cp._retried = False
        cp._apply_row(*self._poll_row(cp.job_id))
        return False

    def _start(
        self, job_id: Any, where: Mapping[str, Any] | None, *, in_executor: bool = False
    ) -> tuple[Checkpoint, bool]:
        """Move the job to in_progress; return its checkpoint and whether this call did it.

        The thread releases its hold on the database when the start fails (no exit will
        follow) or runs in an executor (`async with`: the worker is elsewhere); a
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
        started = True
        # Before the job names this process as its worker, the process's row must be
        # there and fresh; the job leaves the heartbeat once it has stopped.
        rt = runtime()
        worker = rt.join(b, self._heartbeat_period)
        try:
            try:
                applied = b.apply(start_change(worker), job_id=job_id, filters=where)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Interrupted (Ctrl-C, a task cancelled, SystemExit) while the start
                    # was under way: it may have committed. Settle it, or no one would.
                    self._settle_interrupted_start(job_id, worker, exc)
                started = False
                raise
            if not applied:
                started = False
                row = self._read(job_id, where)
                if row.status is not Status.CANCELLED:
                    raise InvalidTransition(
                        b.model_name,
                        job_id,
                        row.status.value,
                        Status.IN_PROGRESS.value,
                        row.worker_id if row.status is Status.IN_PROGRESS else None,
                    )
                # Cancelled before any worker started it: the body must not run, and
                # this run writes nothing (the job may still have a worker elsewhere,
                # a cancelled duplicate delivery's, and only that one says it stopped).
                cancelled = Cancelled(job_id, row.cancel_reason)
                cancelled._dbcancel_key = b.key  # type: ignore[attr-defined]
                raise cancelled
        finally:
            if not started:
                rt.leave(b, self._heartbeat_period)
        cp = Checkpoint(
            self,
            job_id,
            interval=self._interval,
            clock=self._clock,
            key=b.key,
            watched=self._watch,
            max_staleness=self._max_staleness,
            health=self._health,
        )
        return cp, started

    def _settle_interrupted_start(self, job_id: Any, worker: str, exc: BaseException) -> None:
        """End a job whose start this process committed, or may have, but whose run
        will not go on: failed with the interruption, unless it was cancelled meanwhile
        (then only `finished_at`). Only a row that names this process as its worker
        is touched: another worker may have started it instead."""
        b = self._backend
        mine = {"worker_id": worker}
        text = f"interrupted while starting ({type(exc).__name__})"
        try:
            if not b.apply(fail_change(text), job_id=job_id, filters=mine):
                row = b.read(job_id, mine)
                if row is not None and row.finished_at is None:
                    b.mark_stopped(job_id)
        except Exception:
            log.error(
                "dbcancel: %s %r was interrupted while starting and its row could not be "
                "settled; it stays in progress",
                b.model_name,
                job_id,
                exc_info=True,
            )

    def _abandon(self, cp: Checkpoint, started: bool, exc: BaseException) -> None:
        """End a run whose start succeeded but whose body will never run (its task was
        cancelled, or Ctrl-C came, between the start and the `with` block): the job
        ends as if the body had raised `exc`. Safe from any thread."""
        try:
            self._finish(cp, exc, started)
        except Exception:
            log.error(
                "dbcancel: %s %r could not be settled after its start was interrupted",
                self.model_name,
                cp.job_id,
                exc_info=True,
            )
        finally:
            cp._ended()

    def _runtime_add(self, cp: Checkpoint) -> None:
        """Have the runtime thread poll `cp` (until as many `_runtime_remove` calls)."""
        runtime().watch(self._backend, self._health, cp)

    def _runtime_remove(self, cp: Checkpoint) -> None:
        runtime().unwatch(self._backend, cp)

    def _beat_due(self) -> None:
        """Beat the worker row if due: a threadless checkpoint's poll calls this, so
        that a process without a runtime thread keeps its jobs alive to `reap()`."""
        runtime().beat_if_due(self._backend)

    def _finish(self, cp: Checkpoint, exc: BaseException | None, started: bool) -> bool:
        """Record how the job ended; True when `exc` is to be swallowed.

        A run that found its job already cancelled (`started` False) writes nothing: the
        job may still have a worker elsewhere (a cancelled duplicate delivery), and only
        that worker may say it has stopped. The thread then releases its hold on the
        database: the run is over.
        """
        try:
            try:
                swallow = self._finish_job(cp, exc, started)
                if started and _events.on:
                    _events.job_ended(self._backend, cp, exc)
                return swallow
            except BaseException as interrupt:
                if isinstance(interrupt, Exception) or not started:
                    raise
                # Interrupted while writing the end: write it again (every write is
                # conditional, so a second one cannot apply twice), then go on raising.
                with contextlib.suppress(Exception):
                    self._finish_job(cp, exc if exc is not None else interrupt, started)
                raise
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
                self._leave_heartbeat()
            self._backend.release()

    def _leave_heartbeat(self) -> None:
        """The job has stopped: it no longer keeps this process's worker row beating."""
        runtime().leave(self._backend, self._heartbeat_period)

    def _finish_job(self, cp: Checkpoint, exc: BaseException | None, started: bool) -> bool:
        b = self._backend
        job_id = cp.job_id
        own_cancel = isinstance(exc, Cancelled) and _is_own(exc, cp, b.key)
        if not started or cp._retried:
            # A retry moved the row back to pending: the next delivery owns it now.
            return own_cancel
        if exc is None:
            using = cp._completed_in
            if using is not None and _still_open(b, using):
                # cp.complete(using) wrote the end in the caller's transaction, which is
                # still open: a write of ours on another connection would wait for its
                # row lock forever (the caller commits after this block, in this very
                # thread). Its commit ends the job; a rollback is settled when it comes.
                _settle_after_caller(b, job_id)
                return False
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
        text = str(exc) if isinstance(exc, _Interrupted) else error_text(exc)
        if not b.apply(fail_change(text), job_id=job_id):
            b.mark_stopped(job_id, cp._seen_at())
        return False

    def _finish_local_cancel(self, cp: Checkpoint) -> None:
        """Record a job cancelled in this process because its polls kept failing.

        The database is probably still down: a write that fails is logged, not raised,
        so the worker stops as asked; the row then stays in progress until
        [`reap`][dbcancel.Jobs.reap] finds its heartbeat stale.
        """
        b = self._backend
        try:
            # Bounded like a poll: on a frozen network the write would otherwise hold
            # the worker that max_staleness just stopped.
            with _timeouts.limit(_timeouts.POLL_TIMEOUT):
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


def error_text(exc: BaseException) -> str:
    """What the `error` column keeps of `exc`: `"OSError: disk full"`."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _is_own(exc: Cancelled, cp: Checkpoint, key: Any) -> bool:
    exc_key = getattr(exc, "_dbcancel_key", None)
    return bool(exc.job_id == cp.job_id and (exc_key is None or exc_key == key))


class JobRun:
    """The context manager returned by [`Jobs.run`][dbcancel.Jobs.run]; yields the job's Checkpoint.

    Usable once, with `with` in a thread or process, or `async with` in a task (the
    database round trips of enter and exit then run in a worker thread).
    """

    __slots__ = ("_cp", "_entry", "_job_id", "_jobs", "_started", "_watched", "_where")

    def __init__(self, jobs: JobsWorker, job_id: Any, where: Mapping[str, Any] | None) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._where = dict(where) if where else None
        self._cp: Checkpoint | None = None
        self._entry: ActiveJob | None = None
        self._started = False
        self._watched = False

    def _enter(self, cp: Checkpoint, started: bool) -> Checkpoint:
        self._cp = cp
        self._started = started
        self._entry = ActiveJob(cp.job_id, cp, threading.current_thread(), utcnow())
        registry.add(self._jobs._backend.key, self._entry)
        if started and _events.on:
            _events.job_started(self._jobs._backend, cp)
        if cp.watched and started:
            self._jobs._runtime_add(cp)
            self._watched = True
        _push(cp)
        return cp

    def _unwatch(self) -> None:
        # Before the final write: once the job has stopped, the row may be deleted (the
        # cancel-then-delete flow), and the runtime must not report that to a finished job.
        if self._watched:
            assert self._cp is not None
            self._jobs._runtime_remove(self._cp)
            self._watched = False

    def _leave(self) -> None:
        """Leave the run: this context's current checkpoint first, then the process's
        registry (the last step: wait() returns once it is done)."""
        assert self._cp is not None
        _pop(self._cp)
        self._leave_process()

    def _leave_process(self) -> None:
        assert self._cp is not None
        self._unwatch()
        if self._entry is not None:
            registry.remove(self._jobs._backend.key, self._entry)
        self._cp._ended()

    def _enter_or_abandon(self, cp: Checkpoint, started: bool) -> Checkpoint:
        try:
            return self._enter(cp, started)
        except BaseException as exc:  # Ctrl-C between the start and the body
            self._cp = cp
            self._leave()
            self._jobs._abandon(cp, started, exc)
            raise

    def __enter__(self) -> Checkpoint:
        if self._cp is not None:
            raise RuntimeError("a JobRun can be entered only once; call jobs.run() again")
        return self._enter_or_abandon(*self._jobs._start(self._job_id, self._where))

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
        handoff = _Handoff()
        jobs, job_id, where = self._jobs, self._job_id, self._where

        def start() -> tuple[Checkpoint, bool]:
            result = jobs._start(job_id, where, in_executor=True)
            if not handoff.give(result):
                # The task stopped waiting (cancelled, a timeout) while the job started:
                # its run will never go on, so it ends here, in this thread.
                jobs._abandon(
                    *result, _Interrupted("interrupted while starting: its task was cancelled")
                )
            return result

        try:
            cp, started = await asyncio.to_thread(start)
        except BaseException as exc:
            result = handoff.take_back()
            if result is not None:  # started, but the task never saw it: settle it
                await _shielded(functools.partial(jobs._abandon, *result, exc))
            raise
        if not cp.watched and started:
            cp._serve()  # the loop must not poll: the runtime thread does
        try:
            return self._enter(cp, started)
        except BaseException as exc:
            self._cp = cp
            self._leave()
            if not cp.watched and started:
                cp._unserve()
            await _shielded(functools.partial(jobs._abandon, cp, started, exc))
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        cp = self._cp
        assert cp is not None
        _pop(cp)
        if not cp.watched and self._started:
            cp._unserve()
        self._unwatch()
        jobs, started = self._jobs, self._started

        def finish() -> bool:
            try:
                return jobs._finish(cp, exc, started)
            finally:
                self._leave_process()

        # Handed to the executor now, and shielded: a task cancelled while the end is
        # written (a timeout, a server shutting down) still has its end written, and
        # wait() returns only after it.
        return await asyncio.shield(_in_thread(finish))


class _Interrupted(BaseException):
    """Why a run whose task gave up while it started was ended (as its error text)."""


class _Handoff:
    """The result of a start running in a thread, handed to a task that may stop
    waiting for it: exactly one of the two sides ends up owning it."""

    __slots__ = ("_abandoned", "_lock", "_result")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._result: tuple[Checkpoint, bool] | None = None
        self._abandoned = False

    def give(self, result: tuple[Checkpoint, bool]) -> bool:
        """The thread's side: False when the task has given up (the thread owns it)."""
        with self._lock:
            if self._abandoned:
                return False
            self._result = result
            return True

    def take_back(self) -> tuple[Checkpoint, bool] | None:
        """The task's side, giving up: the result if the thread had handed it over
        (the task then owns it), else None (the thread will settle it)."""
        with self._lock:
            self._abandoned = True
            result, self._result = self._result, None
            return result


def _in_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """`fn` submitted to the loop's default executor at once (not when a task gets to
    it: a task cancelled before it starts would never run it)."""
    return asyncio.get_running_loop().run_in_executor(None, fn)


async def _shielded(fn: Callable[[], object]) -> None:
    """Run `fn` in a thread to its end, even if this task is cancelled meanwhile."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(_in_thread(fn))


def _still_open(backend: Any, using: Any) -> bool:
    """True when `using` (what `cp.complete()` was given) is still inside the
    transaction in which it completed the job."""
    probe = getattr(backend, "transaction_open", None)
    return bool(probe(using)) if callable(probe) else False


def _settle_after_caller(backend: Any, job_id: Any) -> None:
    """Fail the job once the caller's open transaction ends, if that transaction was
    rolled back (its commit completes the job, and then this writes nothing).

    Runs in a thread of its own: the conditional UPDATE waits for the caller's row
    lock, that is, for the caller's commit or rollback.
    """

    def settle() -> None:
        text = "the transaction of cp.complete() was rolled back after the run ended"
        deadline = time.monotonic() + _SETTLE_FOR
        delay = 0.05
        while True:
            try:
                if backend.apply(fail_change(text), job_id=job_id):
                    log.warning("dbcancel: %s %r failed: %s", backend.model_name, job_id, text)
                return
            except Exception:
                if time.monotonic() > deadline:
                    log.error(
                        "dbcancel: %s %r: could not check the end of its run after the "
                        "caller's transaction; it may stay in progress",
                        backend.model_name,
                        job_id,
                        exc_info=True,
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    backend.release()

    threading.Thread(target=settle, name="dbcancel-settle", daemon=True).start()


_SETTLE_FOR = 3600.0
"""Seconds a settle thread keeps trying while the caller's transaction stays open."""
