"""The delivery core of the task-queue integrations: one message, one run of a job's body.

A task queue hands a worker a message naming a job; what dbcancel does with it is the
same for every queue, and lives here, knowing nothing of any queue:

* start the job's row (pending → in_progress), or decide not to run: cancelled (or
  deleted), finished, or running elsewhere;
* run the body in `jobs.run()`, calling it `body(cp, job_id, *args, **kwargs)`;
* end it, and say how in one [`Outcome`][dbcancel._delivery.Outcome]: completed, failed,
  cancelled, not runnable, busy elsewhere, a retry the body asked for (the row back to
  `pending`, unless a cancel came first), or deferred (the worker's warm shutdown began
  before the job started: the message goes back to the queue);
* keep one [`Jobs`][dbcancel.Jobs] per process, built on first use and again after a fork
  (the adapter's `dispose` forgets what the parent's connections were);
* on a worker's warm shutdown, cancel the jobs it runs and defer what arrives after.

Each adapter (`dbcancel.contrib.celery`, `.django.tasks`, `.rq`, `.dramatiq`) only maps
the outcome to its queue's vocabulary: Celery's REVOKED and `Ignore`, a raised
[`JobCancelled`][dbcancel.JobCancelled], a requeued message.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ._worker import error_text
from .checkpoint import Checkpoint, current
from .errors import (
    Cancelled,
    DbcancelError,
    InvalidTransition,
    JobCancelled,
    JobNotFound,
    JobNotRunnable,
)
from .jobs import Jobs
from .models import Status

__all__ = ["WORKER_SHUTDOWN_REASON", "Delivery", "Ending", "OnShutdown", "Outcome"]

log = logging.getLogger("dbcancel")

WORKER_SHUTDOWN_REASON = "worker shutdown"
"""The cancel reason of the jobs a task queue worker's warm shutdown stopped. (The
process-wide [`dbcancel.shutdown`][dbcancel.shutdown] says `"shutdown"`.)"""

DELETED = "deleted"
"""The reason of an outcome whose job row was missing."""

OnShutdown = Literal["cancel", "wait"]

J = TypeVar("J", bound=Jobs)


_NEVER_RETRIED = (Cancelled, SystemExit, KeyboardInterrupt, GeneratorExit)


class Ending(enum.Enum):
    """How one delivery of a job ended."""

    COMPLETED = "completed"
    """The body returned; the row is `completed`."""
    FAILED = "failed"
    """The body raised; the row is `failed`, with the error."""
    RETRY = "retry"
    """The body asked for a retry; the row is `pending` again, its error kept."""
    CANCELLED = "cancelled"
    """Cancelled before or while the body ran, or the row is missing."""
    NOT_RUNNABLE = "not_runnable"
    """The row was completed or failed (a duplicate message), or left `in_progress`
    another way while the body ran (reaped): nothing ran, or its end was not written."""
    BUSY = "busy"
    """The row is `in_progress` under another run: nothing ran."""
    DEFERRED = "deferred"
    """The worker's warm shutdown began before the job started: nothing ran, the row
    is unchanged, and the message goes back to the queue."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one delivery: `ending`, and what goes with it."""

    ending: Ending
    model: str
    job_id: Any
    value: Any = None
    """The body's return value (COMPLETED)."""
    error: Exception | None = None
    """The body's exception (FAILED, RETRY; CANCELLED when it raised after the cancel)."""
    reason: str | None = None
    """The cancel reason (CANCELLED; `"deleted"` for a missing row)."""
    status: str | None = None
    """The row's status (NOT_RUNNABLE, BUSY)."""

    def exception(self) -> DbcancelError:
        """The error a queue records for a cancelled or not runnable delivery."""
        if self.ending is Ending.CANCELLED:
            return JobCancelled(self.model, self.job_id, self.reason)
        status = self.status or Status.IN_PROGRESS.value
        return JobNotRunnable(self.model, self.job_id, status)


class Delivery(Generic[J]):
    """What a task-queue integration keeps for one job table: the per-process `Jobs`,
    the runs under way here, and the warm-shutdown state.

    `build` makes this process's `Jobs` (called on first use, and again in a forked
    child); `dispose`, called in a child before that, forgets what it inherited (an
    engine's pool: `engine.dispose(close=False)`). `on_shutdown`: what
    [`begin_shutdown`][dbcancel._delivery.Delivery.begin_shutdown] does to running jobs.
    """

    def __init__(
        self,
        build: Callable[[], J],
        *,
        dispose: Callable[[], None] | None = None,
        on_shutdown: OnShutdown = "cancel",
    ) -> None:
        if on_shutdown not in ("cancel", "wait"):
            raise ValueError(f'on_shutdown must be "cancel" or "wait", got {on_shutdown!r}')
        self._build = build
        self._dispose = dispose
        self.on_shutdown: OnShutdown = on_shutdown
        self._lock = threading.Lock()
        self._jobs: J | None = None
        self._pid = os.getpid()
        self._running: Counter[Any] = Counter()
        self._shutting_down = False

    # -- the process's Jobs -----------------------------------------------------------

    @property
    def jobs(self) -> J:
        """This process's `Jobs`, built on first use and again after a fork."""
        with self._lock:
            if self._pid != os.getpid():
                self._forked()
            if self._jobs is None:
                self._jobs = self._build()
            return self._jobs

    def after_fork(self) -> None:
        """A queue's hook for a new worker process (Celery's `worker_process_init`):
        forget what the parent had, whether or not the pid shows a fork yet."""
        with self._lock:
            self._forked()

    def _forked(self) -> None:
        if self._dispose is not None:
            self._dispose()
        self._jobs = None
        self._pid = os.getpid()
        self._running = Counter()
        self._shutting_down = False

    # -- one delivery -----------------------------------------------------------------

    def deliver(
        self,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
    ) -> Outcome:
        """Run `body(cp, job_id, *args, **kwargs)` for job `job_id`; say how it ended.

        `retry_if(exc)`: True when the queue will retry the delivery after `exc` from
        the body; the row then goes back to `pending` before `exc` leaves the run,
        unless the job was cancelled meanwhile (CANCELLED: the queue must not retry).
        It is asked about every exception but a `Cancelled`, `SystemExit`,
        `KeyboardInterrupt` or `GeneratorExit` (a queue's own interrupts, Dramatiq's
        time limit say, may be retried). A body that already asked through
        [`retry`][dbcancel._delivery.Delivery.retry] ends RETRY whatever it raises.
        Exceptions that are not `Exception`s propagate, after the run has recorded
        them (or left the row `pending` for the retry).
        """
        jobs = self.jobs
        model = jobs.model_name
        if self._shutting_down:
            return Outcome(Ending.DEFERRED, model, job_id)
        try:
            run = jobs.run(job_id)
            cp = run.__enter__()
        except Cancelled as exc:
            if exc.job_id != job_id:
                raise
            return Outcome(Ending.CANCELLED, model, job_id, reason=exc.reason)
        except InvalidTransition as err:
            ending = Ending.BUSY if err.current == Status.IN_PROGRESS.value else None
            return Outcome(ending or Ending.NOT_RUNNABLE, model, job_id, status=err.current)
        except JobNotFound:
            # Cancelled and then deleted while the message was queued, most likely.
            return Outcome(Ending.CANCELLED, model, job_id, reason=DELETED)
        with self._lock:
            self._running[job_id] += 1
        try:
            try:
                value = body(cp, job_id, *args, **(kwargs or {}))
            except BaseException as exc:
                if (
                    not isinstance(exc, _NEVER_RETRIED)
                    and retry_if is not None
                    and not cp._retried
                    and not cp.cancelled
                    and retry_if(exc)
                ):
                    self._retry_row(jobs, cp, exc)
                if not run.__exit__(type(exc), exc, exc.__traceback__):
                    raise
                value = None
            else:
                run.__exit__(None, None, None)
        except Exception as exc:
            if cp._retried:
                return Outcome(Ending.RETRY, model, job_id, error=exc)
            if cp.cancelled:
                # An error raised because of the cancel (a socket closed by on_cancel,
                # say): the cancel wins, and no retry runs the job again.
                return self._stopped(jobs, job_id, cp, exc)
            return Outcome(Ending.FAILED, model, job_id, error=exc)
        finally:
            with self._lock:
                self._running[job_id] -= 1
                if self._running[job_id] <= 0:
                    del self._running[job_id]
        if cp.cancelled:
            return self._stopped(jobs, job_id, cp, None)
        return Outcome(Ending.COMPLETED, model, job_id, value=value)

    def retry(self, job_id: Any, exc: BaseException | None) -> bool | None:
        """The body of job `job_id`, running in this thread, asks for a retry now
        (before its queue sends the retry's message): move the row back to `pending`.

        True when it is pending (send the retry); False when the job was cancelled
        meanwhile (send nothing: the checkpoint raises
        [`Cancelled`][dbcancel.Cancelled] at its next call, and the delivery ends
        CANCELLED); None when no run of `job_id` is under way in this thread (the run
        already ended, having moved the row itself, or the call comes from elsewhere).
        """
        cp = current()
        if cp is None or cp.job_id != job_id or cp._source is not self._jobs:
            return None
        assert self._jobs is not None
        return self._retry_row(self._jobs, cp, exc)

    def _retry_row(self, jobs: J, cp: Checkpoint, exc: BaseException | None) -> bool:
        text = "retry requested" if exc is None else error_text(exc)
        try:
            return jobs._retry(cp, text)
        except Exception:
            log.exception(
                "dbcancel: %s %r: could not move the row back to pending for a retry; "
                "the job fails instead",
                jobs.model_name,
                cp.job_id,
            )
            return False

    def _stopped(self, jobs: J, job_id: Any, cp: Checkpoint, exc: Exception | None) -> Outcome:
        """A run that stopped on its checkpoint, by what the row says now."""
        model = jobs.model_name
        try:
            status = jobs.status(job_id)
        except JobNotFound:  # cancelled, stopped, then deleted: the cancel-then-delete flow
            return Outcome(Ending.CANCELLED, model, job_id, error=exc, reason=cp.reason or DELETED)
        if status is Status.CANCELLED:
            return Outcome(Ending.CANCELLED, model, job_id, error=exc, reason=cp.reason)
        # Reaped or changed by hand while it ran: the row says failed.
        return Outcome(Ending.NOT_RUNNABLE, model, job_id, error=exc, status=status.value)

    # -- warm shutdown ----------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """True once [`begin_shutdown`][dbcancel._delivery.Delivery.begin_shutdown] ran in
        this process: deliveries from now on are DEFERRED."""
        return self._shutting_down

    def running(self) -> list[Any]:
        """The ids of the jobs this table's deliveries run in this process now."""
        with self._lock:
            return list(self._running)

    def begin_shutdown(
        self,
        job_ids: Iterable[Any] | None = None,
        *,
        defer: bool = True,
        reason: str = WORKER_SHUTDOWN_REASON,
    ) -> threading.Thread | None:
        """The worker's warm shutdown began: later deliveries in this process are
        DEFERRED (with `defer`), and with `on_shutdown="cancel"` the jobs `job_ids`
        (default: those running here) are cancelled with `reason`, from a thread of
        its own (this may be a signal handler, interrupting a query of the worker's
        thread). Returns that thread, or None when nothing is cancelled."""
        if defer:
            self._shutting_down = True
        if self.on_shutdown != "cancel":
            return None
        ids = self.running() if job_ids is None else list(job_ids)
        if not ids:
            return None
        thread = threading.Thread(
            target=self.cancel_all, args=(ids, reason), name="dbcancel-queue-shutdown"
        )
        thread.start()
        return thread

    def cancel_all(self, ids: Iterable[Any], reason: str) -> None:
        """Cancel each job of `ids` with `reason`; log (and go on past) what fails."""
        jobs = self.jobs
        for job_id in ids:
            try:
                jobs.cancel(job_id, reason=reason)
            except Exception:
                log.exception(
                    "dbcancel: could not cancel %s %r (%s); it runs on until it ends, or "
                    "reap() settles it",
                    jobs.model_name,
                    job_id,
                    reason,
                )
            finally:
                jobs._backend.release()
