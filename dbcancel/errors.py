"""The exceptions dbcancel raises.

`Cancelled` derives from `BaseException`, like `asyncio.CancelledError`
and `KeyboardInterrupt`, so that a broad `except Exception` around one item of a
worker loop cannot swallow a cancellation. Everything else derives from
[`DbcancelError`][dbcancel.DbcancelError].
"""

from __future__ import annotations

from typing import Any

from .models import JobId

__all__ = [
    "Cancelled",
    "DbcancelError",
    "InvalidTransition",
    "JobCancelled",
    "JobNotFound",
    "JobNotRunnable",
    "UsageError",
]


class Cancelled(BaseException):
    """Raised by a checkpoint when its job has been cancelled (or its row deleted).

    `job_id` is the id of the cancelled job; `reason` is the reason given to
    [`Jobs.cancel`][dbcancel.Jobs.cancel], `"deleted"` when the row disappeared, or `None`.
    `jobs.run()` swallows the `Cancelled` of its own job, so a worker normally never
    needs to catch it.
    """

    def __init__(self, job_id: JobId, reason: str | None = None) -> None:
        self.job_id = job_id
        self.reason = reason
        text = f"job {job_id!r} was cancelled"
        if reason:
            text += f": {reason}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id, self.reason))


class DbcancelError(Exception):
    """Base class of every dbcancel error except [`Cancelled`][dbcancel.Cancelled]."""


class JobNotFound(DbcancelError, LookupError):
    """No job row has this id (or it exists but does not match the `where` filters).

    A row that exists but belongs to someone else is reported exactly like a missing row,
    so that callers cannot probe for other users' jobs. `changing` is True when the call
    would have changed the row (a cancel, a run): the message then says that nothing was
    changed; a read ([`Jobs.status`][dbcancel.Jobs.status], [`Jobs.wait`][dbcancel.Jobs.wait])
    changes nothing by nature and does not say so.
    """

    def __init__(
        self,
        model: str,
        job_id: JobId,
        where: dict[str, Any] | None = None,
        *,
        changing: bool = True,
    ) -> None:
        self.model = model
        self.job_id = job_id
        self.where = dict(where) if where else None
        self.changing = changing
        text = f"{model} {job_id!r} not found"
        if where:
            text += f" (or it does not match {self.where!r})"
        super().__init__(text + ("; nothing was changed" if changing else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_job_not_found, (type(self), self.model, self.job_id, self.where, self.changing))


def _job_not_found(
    cls: type[JobNotFound], model: str, job_id: JobId, where: Any, changing: bool
) -> JobNotFound:
    """Rebuild a pickled [`JobNotFound`][dbcancel.JobNotFound] (its `changing` is
    keyword-only)."""
    return cls(model, job_id, where, changing=changing)


class InvalidTransition(DbcancelError):
    """A status change that the transition table does not allow.

    `current` is the status the row had when the change was refused, `wanted` the
    status that was asked for, `worker` the worker the row names (`host:pid:token`, or
    None): a run refused because the job is already running says in which worker.
    """

    def __init__(
        self, model: str, job_id: JobId, current: str, wanted: str, worker: str | None = None
    ) -> None:
        self.model = model
        self.job_id = job_id
        self.current = current
        self.wanted = wanted
        self.worker = worker
        if current == wanted == "in_progress":
            where = f" in worker {worker}" if worker else ""
            text = (
                f"{model} {job_id!r} is already running{where}, so it cannot start again "
                f"(from {current!r} to {wanted!r}); nothing was changed. A job runs once: "
                "wait for it (jobs.wait), cancel it, or, if that worker is gone, let "
                "jobs.reap() fail it and create a new job"
            )
        else:
            text = (
                f"{model} {job_id!r} cannot go from {current!r} to {wanted!r}; nothing was changed"
            )
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model, self.job_id, self.current, self.wanted, self.worker))


class JobCancelled(DbcancelError):
    """A task of a task queue found its job cancelled (or its row deleted): the body did
    not finish, or never started.

    What the task-queue integrations record as such a task's failure where the queue has
    no state of its own for a revoked task (Django Tasks, RQ, Dramatiq; Celery records
    REVOKED): its text is `Analysis 12 was cancelled: user deleted it`. `job_id` is the
    job's id, `model` the name of the job model and `reason` the cancel reason
    (`"deleted"` for a missing row, or None).
    """

    def __init__(self, model: str, job_id: JobId, reason: str | None = None) -> None:
        self.model = model
        self.job_id = job_id
        self.reason = reason
        # The arguments themselves: result backends rebuild an exception as cls(*args).
        super().__init__(model, job_id, reason)

    def __str__(self) -> str:
        text = f"{self.model} {self.job_id!r} was cancelled"
        return text + (f": {self.reason}" if self.reason else "")


class JobNotRunnable(DbcancelError):
    """A task of a task queue found its job failed, completed or in progress: nothing ran.

    Raised (and recorded as the task's failure) by the task-queue integrations
    ([`dbcancel.contrib.celery`][dbcancel.contrib.celery],
    [`dbcancel.contrib.django.tasks`][dbcancel.contrib.django.tasks],
    [`dbcancel.contrib.rq`][dbcancel.contrib.rq],
    [`dbcancel.contrib.dramatiq`][dbcancel.contrib.dramatiq]) when a second message
    arrives for a job whose body already ran to its end (or runs in another worker now),
    and when a job was reaped or failed by hand while its body ran. A retry the body
    asked for is not such a message: it moved the job back to `pending`, and runs.
    `status` is the row's status, `job_id` the job's id and `model` the name of the job
    model.
    """

    def __init__(self, model: str, job_id: JobId, status: str) -> None:
        self.model = model
        self.job_id = job_id
        self.status = status
        # The arguments themselves: result backends (Celery's) rebuild an exception as
        # cls(*args), so a recorded failure reads back as this class.
        super().__init__(model, job_id, status)

    def __str__(self) -> str:
        return (
            f"{self.model} {self.job_id!r} is {self.status!r}, not pending: a job's body "
            "runs at most once to an end, and never beside another run of it, so this run "
            "did nothing; create a new job to run the work again"
        )


class UsageError(DbcancelError, RuntimeError):
    """dbcancel was called where it cannot do its work, and did nothing: inside the
    caller's open transaction (`DjangoJobs` commits every change on its own), outside
    a Flask app context, on an app without the extension. The message says what to do
    instead. A `RuntimeError` too, as these errors were before they had a class.
    """
