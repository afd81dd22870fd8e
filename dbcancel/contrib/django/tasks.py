"""Django Tasks integration: tasks whose first argument is a job id and whose body gets its
checkpoint.

```python
# analyses/tasks.py
from dbcancel.contrib.django.tasks import DjangoTaskJobs

cancellable = DjangoTaskJobs("analyses.Analysis", interval=0.5)

@cancellable.task(queue_name="default")
def analyse(cp, job_id, folder):            # runs inside jobs.run(job_id)
    for path in walk(folder):
        cp()                                # raises Cancelled once cancelled
        process(path)

analyse.enqueue(analysis.pk, "/data/a")     # the job id first, then your arguments
cancellable.jobs.cancel(analysis.pk, reason="user deleted it")   # anywhere
```

Works with `django.tasks` (Django 6 and newer) and with the `django-tasks` backport
(Django 5.2): the task is the framework's own `Task`, sent by any backend, run by any
worker (`manage.py db_worker` of `django-tasks-db`, say).

What each run of a task does, by the state of the job's row when it starts:

* `pending`: the body runs inside `jobs.run(job_id)`. It returns: the job is
  `completed` and the task result is SUCCESSFUL with the body's return value. It
  raises: the job is `failed` and the task result FAILED with that exception.
* `cancelled` (before or while the body ran, including an exception the body raised
  after the cancel), or deleted: the body does not run (or stops at its next `cp()`)
  and the task result is FAILED with
  [`JobCancelled`][dbcancel.contrib.django.tasks.JobCancelled]. A cancelled job's task is
  never SUCCESSFUL.
* `failed`, `completed` or `in_progress` (the task enqueued again for a job whose
  body already ran, or runs elsewhere): the body does not run, the row is unchanged, and
  the task result is FAILED with [`JobNotRunnable`][dbcancel.JobNotRunnable]. A job's body
  runs at most once.

Django Tasks has no hook before a task's function runs: all of this happens in the
function the decorator registers, around the body.

Importing this module needs Django Tasks: `pip install 'dbcancel[django-tasks]'`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, Generic, Literal, ParamSpec, Protocol, TypeVar, overload

try:
    try:
        from django.tasks import task as _django_task
    except ImportError:
        from django_tasks import task as _django_task
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.django.tasks needs Django Tasks (django.tasks, built into Django "
        "6, or the django-tasks backport on Django 5.2), which is not installed: "
        "pip install 'dbcancel[django-tasks]' (and, to keep Django 5.2 on Python 3.12 or "
        "newer, pip install django-tasks)"
    ) from err

from django.db import DEFAULT_DB_ALIAS

from dbcancel import Checkpoint, JobId, errors
from dbcancel._delivery import DELETED, WORKER_SHUTDOWN_REASON, Delivery, Ending, OnShutdown
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel._options import DEFAULT_INTERVAL, Options, OptionsView
from dbcancel.errors import JobNotRunnable

from .jobs import DjangoJobs

__all__ = [
    "SHUTDOWN_REASON",
    "CancellableTask",
    "DjangoTaskJobs",
    "JobCancelled",
    "JobNotRunnable",
]

log = logging.getLogger("dbcancel")

P = ParamSpec("P")
R = TypeVar("R", covariant=True)

SHUTDOWN_REASON = WORKER_SHUTDOWN_REASON
"""The cancel reason of the job a worker's warm shutdown stops (`on_shutdown="cancel"`):
`"worker shutdown"`, the same in every task-queue integration."""

_SHUTDOWN_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGQUIT") if hasattr(signal, name)
)


# The loggers through which Django Tasks reports a task's end: Django 6's, the backport's.
_TASKS_LOGGERS = ("django.tasks", "django_tasks")


class _CancelledInOneLine(logging.Filter):
    """The end of a task whose job was cancelled, as one line: Django Tasks logs every
    FAILED task with `logger.exception`, so a worker printed a whole traceback for each
    cancel, which reads like a crash. The record keeps its text and gains the reason;
    it loses the traceback and is logged at INFO (a cancel is no error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, JobCancelled):
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _log_cancels_in_one_line() -> None:
    """Put the filter on the Django Tasks loggers, once."""
    for name in _TASKS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _CancelledInOneLine) for f in logger.filters):
            logger.addFilter(_CancelledInOneLine())


class JobCancelled(errors.JobCancelled):
    """A cancellable task's job was cancelled (or its row deleted): the body did not finish.

    The [`JobCancelled`][dbcancel.JobCancelled] of Django Tasks, a subclass under this
    module's name, which results already recorded name. The task result of such a run
    is FAILED with it: `result.errors[0].exception_class` is this class, and its
    traceback ends with `Analysis 12 was cancelled: user deleted it`. `job_id` is the
    job's id, `model` the name of the job model and `reason` the cancel reason
    (`"deleted"` for a missing row, or None).
    """


class CancellableTask(Protocol, Generic[P, R]):
    """What [`DjangoTaskJobs.task`][dbcancel.contrib.django.tasks.DjangoTaskJobs.task]
    returns: a Django Tasks `Task` taking the job id first.

    It is the framework's own `Task` object (every attribute and method of it works);
    the methods below are typed so that calls are checked against the body's signature
    minus its checkpoint.
    """

    @property
    def name(self) -> str:
        """The task's name (the body's function name)."""
        ...

    @property
    def module_path(self) -> str:
        """The dotted path a worker imports the task by."""
        ...

    def enqueue(self, job_id: JobId, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Queue the task for job `job_id`; returns the backend's `TaskResult`."""
        ...

    async def aenqueue(self, job_id: JobId, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """[`enqueue`][dbcancel.contrib.django.tasks.CancellableTask.enqueue] for async code."""
        ...

    def call(self, job_id: JobId, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here, now, as a worker does (a job that is not pending raises)."""
        ...

    def using(
        self,
        *,
        priority: int | None = None,
        queue_name: str | None = None,
        run_after: Any = None,
        backend: str | None = None,
    ) -> CancellableTask[P, R]:
        """The same task with other defaults (`Task.using()`)."""
        ...

    def get_result(self, result_id: str) -> Any:
        """The `TaskResult` of one run of this task, by its id."""
        ...


class DjangoTaskJobs(OptionsView):
    """Cancellable Django Tasks for the jobs of one model.

    `model`, `using`, `interval`, `clock`, `watch`, `max_staleness`, `heartbeat`,
    `listen_url` and `push` are those of
    [`DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs], which each process builds for
    itself on first use
    ([`jobs`][dbcancel.contrib.django.tasks.DjangoTaskJobs.jobs]), so a module can declare
    its tasks while Django loads its apps; they read back as `Jobs` shows them (`watch`
    is the mode in effect).

    `on_shutdown`: what a warm shutdown of the worker (its first SIGTERM or SIGINT)
    does to the job it runs. `"cancel"` (the default) cancels it with the reason
    [`SHUTDOWN_REASON`][dbcancel.contrib.django.tasks.SHUTDOWN_REASON]: it stops at its next
    checkpoint, ends `cancelled` with `finished_at` set, its task result is FAILED with
    [`JobCancelled`][dbcancel.JobCancelled], and the worker exits.
    `"wait"` keeps the worker's own behaviour: it finishes the running task, then exits.
    This works for workers that run tasks in their main thread and handle these signals
    themselves, as `manage.py db_worker` does; elsewhere the signals are left alone.
    """

    def __init__(
        self,
        model: Any,
        *,
        using: str = DEFAULT_DB_ALIAS,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        listen_url: Any = None,
        push: str | None = None,
        on_shutdown: OnShutdown = "cancel",
    ) -> None:
        self._options = Options.checked(
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            push=push,
            listen_url=listen_url,
        )
        if on_shutdown not in ("cancel", "wait"):
            raise ValueError(f'on_shutdown must be "cancel" or "wait", got {on_shutdown!r}')
        self._model = model
        self._using = using
        self._delivery: Delivery[DjangoJobs] = Delivery(
            lambda: DjangoJobs(model, using=using, **self._options.kwargs()),
            on_shutdown=on_shutdown,
        )
        self._task_names: set[str] = set()
        _log_cancels_in_one_line()

    # -- public -----------------------------------------------------------------------

    @property
    def on_shutdown(self) -> OnShutdown:
        """`"cancel"` or `"wait"`: what a warm shutdown does to the running job."""
        return self._delivery.on_shutdown

    @property
    def using(self) -> str:
        """The database alias the jobs are read and written through."""
        return self._using

    @property
    def task_names(self) -> frozenset[str]:
        """The module paths of the tasks declared through
        [`task`][dbcancel.contrib.django.tasks.DjangoTaskJobs.task]."""
        return frozenset(self._task_names)

    @property
    def jobs(self) -> DjangoJobs:
        """This process's [`DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs], built on
        first use (and again after a fork)."""
        return self._delivery.jobs

    @overload
    def task(
        self,
        *,
        takes_context: Literal[False] = False,
        **options: Any,
    ) -> Callable[[Callable[Concatenate[Checkpoint, Any, P], R]], CancellableTask[P, R]]: ...

    @overload
    def task(
        self,
        *,
        takes_context: Literal[True],
        **options: Any,
    ) -> Callable[[Callable[Concatenate[Any, Checkpoint, Any, P], R]], CancellableTask[P, R]]: ...

    def task(self, *, takes_context: bool = False, **options: Any) -> Callable[[Any], Any]:
        """Declare a cancellable task: `@cancellable.task(**task_options)`.

        The decorated body is called as `body(cp, job_id, *args, **kwargs)` inside
        `jobs.run(job_id)` (with `takes_context=True`: `body(context, cp, job_id,
        ...)`, the first parameter named `context` as Django Tasks asks); the task is
        queued as `task.enqueue(job_id, *args, **kwargs)`, with JSON-serialisable
        arguments (a UUID job id as a string). `options` are those of Django Tasks'
        `@task` (`priority`, `queue_name`, `backend`). The body is a plain
        function defined at module level; async bodies are not supported. See the
        module's documentation for what each run does by the state of the row.
        """

        def decorate(body: Callable[..., Any]) -> Any:
            if inspect.iscoroutinefunction(body):
                raise TypeError(
                    f"{body.__qualname__} is async: cancellable tasks run their body inside "
                    "jobs.run(), which needs a plain function; make it a def"
                )
            if takes_context:

                @functools.wraps(body)
                def run_with_context(context: Any, job_id: Any, *args: Any, **kw: Any) -> Any:
                    return self._run(job_id, functools.partial(body, context), args, kw)

                function: Callable[..., Any] = run_with_context
            else:

                @functools.wraps(body)
                def run(job_id: Any, *args: Any, **kw: Any) -> Any:
                    return self._run(job_id, body, args, kw)

                function = run
            created: Any = _django_task(takes_context=takes_context, **options)(function)
            self._task_names.add(created.module_path)
            return created

        return decorate

    def __repr__(self) -> str:
        return f"<DjangoTaskJobs {self._model!r} on_shutdown={self.on_shutdown!r}>"

    # -- running a task ---------------------------------------------------------------

    def _run(
        self,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        jobs = self.jobs
        with self._shutdown_cancels(job_id):
            # Django Tasks has no retries: an exception from the body fails the job.
            outcome = self._delivery.deliver(job_id, body, args, kwargs)
        ending = outcome.ending
        if ending is Ending.COMPLETED:
            return outcome.value
        if ending is Ending.FAILED:
            assert outcome.error is not None
            raise outcome.error
        if ending is Ending.CANCELLED and outcome.reason == DELETED and outcome.error is None:
            log.warning("dbcancel: a task found no %s %r: nothing ran", jobs.model_name, job_id)
        if ending is Ending.BUSY:
            log.warning(
                "dbcancel: a task for %s %r found it in_progress: the body did not run again",
                jobs.model_name,
                job_id,
            )
        exc = outcome.exception()
        if ending is Ending.CANCELLED:
            exc = JobCancelled(outcome.model, job_id, outcome.reason)
        raise exc from outcome.error

    # -- warm shutdown ----------------------------------------------------------------

    @contextmanager
    def _shutdown_cancels(self, job_id: Any) -> Iterator[None]:
        """While the body runs, make the worker's first shutdown signal cancel the job.

        Only in the main thread (where Python runs signal handlers), and only over
        handlers that the worker installed itself: the worker's handler still runs, after
        the cancel is started, and it gets the signals back for a second one.
        """
        if self.on_shutdown != "cancel" or threading.current_thread() is not (
            threading.main_thread()
        ):
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in _SHUTDOWN_SIGNALS}
        ours: dict[int, Any] = {}

        def restore() -> None:
            for sig, handler in previous.items():
                if sig in ours and signal.getsignal(sig) is ours[sig]:
                    signal.signal(sig, handler)

        def on_signal(signum: int, frame: Any) -> None:
            restore()
            # Not here: the main thread may be inside a query on its own connection.
            # db_worker takes no task after this one, so nothing is left to defer.
            self._delivery.begin_shutdown([job_id], defer=False, reason=SHUTDOWN_REASON)
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)

        for sig, handler in previous.items():
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, on_signal)
                ours[sig] = on_signal
        try:
            yield
        finally:
            restore()
