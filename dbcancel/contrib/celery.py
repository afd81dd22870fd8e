"""Celery integration: tasks whose first argument is a job id and whose body gets its checkpoint.

```python
from celery import Celery
from sqlalchemy import create_engine
from dbcancel.contrib.celery import CeleryJobs

app = Celery("proj", broker="amqp://...", backend="redis://...")
engine = create_engine(DATABASE_URL)
cancellable = CeleryJobs(app, engine, Analysis, interval=0.5)

@cancellable.task(autoretry_for=(ConnectionError,))
def analyse(cp, job_id, path):              # runs inside jobs.run(job_id)
    for chunk in read(path):
        cp()                                # raises Cancelled once cancelled
        process(chunk)

analyse.delay(job_id, "/data/a.bin")        # the job id first, then your arguments
cancellable.jobs.cancel(job_id, reason="user deleted it")   # anywhere
```

Building a [`CeleryJobs`][dbcancel.contrib.celery.CeleryJobs] connects its Celery signal
handlers (once per instance, whatever the number of tasks): `worker_process_init` disposes
of the engine that a prefork child inherited (`engine.dispose(close=False)`) and makes the
child build its own [`Jobs`][dbcancel.Jobs]; `worker_shutting_down` cancels the jobs this
worker node is running, with the reason
[`SHUTDOWN_REASON`][dbcancel.contrib.celery.SHUTDOWN_REASON], unless `on_shutdown="wait"`;
`task_revoked` cancels the job of a task Celery revoked or let expire, so that its row does
not stay pending ([`REVOKED_REASON`][dbcancel.contrib.celery.REVOKED_REASON],
[`EXPIRED_REASON`][dbcancel.contrib.celery.EXPIRED_REASON]).

What each delivery of a task does, by the state of the job's row:

* `pending`: the body runs inside `jobs.run(job_id)`. It returns: the job is
  `completed` and Celery records SUCCESS with the body's return value. It raises: the
  job is `failed` and the exception goes to Celery as usual (FAILURE, or a retry).
* `cancelled` (before or while the body ran, including an exception the body raised
  after the cancel), or deleted: Celery records REVOKED (the result raises
  `TaskRevokedError` with the cancel reason) and the task neither succeeds nor retries.
* `failed` (a retry of an attempt whose body raised) or `completed` (a duplicate
  delivery): the body does not run; Celery records FAILURE with
  [`JobNotRunnable`][dbcancel.JobNotRunnable] for this delivery. A job's body runs at most
  once.
* `in_progress` (a duplicate delivery while another worker runs it, or one whose
  worker died and that `reap()` will settle): the body does not run, a warning is
  logged, and nothing is recorded: the running attempt records its own result.

Results go to whatever result backend the app has; with none, or `ignore_result=True`,
nothing is recorded and such deliveries end as Celery's `Ignore` does.

Importing this module needs Celery: `pip install 'dbcancel[celery]'`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Concatenate, Generic, Literal, NoReturn, ParamSpec, Protocol, TypeVar

try:
    from celery import signals
    from celery.backends.base import DisabledBackend
    from celery.exceptions import Ignore
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.celery needs Celery, which is not installed: "
        "pip install 'dbcancel[celery]'"
    ) from err

from sqlalchemy import Engine

from dbcancel import Checkpoint, InvalidTransition, JobId, JobNotFound, Jobs, Status
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel.errors import JobNotRunnable

__all__ = [
    "EXPIRED_REASON",
    "REVOKED_REASON",
    "SHUTDOWN_REASON",
    "CancellableTask",
    "CeleryJobs",
    "JobNotRunnable",
]

log = logging.getLogger("dbcancel")

P = ParamSpec("P")
R = TypeVar("R", covariant=True)

SHUTDOWN_REASON = "worker shutdown"
"""The cancel reason of the jobs a warm shutdown stops (`on_shutdown="cancel"`)."""

REVOKED_REASON = "revoked in Celery"
"""The cancel reason of a job whose task Celery revoked (`AsyncResult.revoke()`)."""

EXPIRED_REASON = "expired in Celery"
"""The cancel reason of a job whose task expired before it ran (`expires=`)."""

OnShutdown = Literal["cancel", "wait"]


class CancellableTask(Protocol, Generic[P, R]):
    """What [`CeleryJobs.task`][dbcancel.contrib.celery.CeleryJobs.task] returns: a Celery
    task taking the job id first.

    It is the task object Celery registered (every method of `celery.Task` works); the
    methods below are typed so that calls are checked against the body's signature minus
    its checkpoint.
    """

    name: str
    """The task's registered name."""

    def __call__(self, job_id: JobId, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here, now, as Celery does for a direct call; a job that is not
        pending, or is cancelled meanwhile, raises `celery.exceptions.Ignore`."""
        ...

    def delay(self, job_id: JobId, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Send the task for job `job_id`; returns Celery's `AsyncResult`."""
        ...

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send the task with Celery's options (`args` starts with the job id)."""
        ...


class CeleryJobs:
    """Cancellable Celery tasks for the jobs of one table.

    `app` is the Celery app, `engine` the SQLAlchemy Engine of the job table and
    `model` its mapped class (or Table), as for [`Jobs`][dbcancel.Jobs]; `interval`,
    `watch`, `max_staleness` and `heartbeat` are passed to the `Jobs` that each
    worker process builds for itself on first use.

    `on_shutdown`: what a warm shutdown (SIGTERM) of a worker node does to the jobs it
    runs. `"cancel"` (the default) cancels them with the reason
    [`SHUTDOWN_REASON`][dbcancel.contrib.celery.SHUTDOWN_REASON]: they stop at their next
    checkpoint (within `interval` in a prefork child; at once in the threads and solo
    pools), end `cancelled` with Celery's state REVOKED, and the node exits. `"wait"` keeps
    Celery's own behaviour: the node finishes its running tasks before it exits.
    """

    def __init__(
        self,
        app: Any,
        engine: Engine,
        model: Any,
        *,
        interval: float = 0.5,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        on_shutdown: OnShutdown = "cancel",
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(
                f"CeleryJobs needs the SQLAlchemy Engine of the job table, got {engine!r}; "
                "pass create_engine(url), not a URL or a Session"
            )
        if on_shutdown not in ("cancel", "wait"):
            raise ValueError(f'on_shutdown must be "cancel" or "wait", got {on_shutdown!r}')
        self._app = app
        self._engine = engine
        self._model = model
        self._options: dict[str, Any] = {
            "interval": interval,
            "watch": watch,
            "max_staleness": max_staleness,
            "heartbeat": heartbeat,
        }
        # Validate the options now, in the process that declares the tasks.
        Jobs(engine, model, **self._options)
        self._on_shutdown: OnShutdown = on_shutdown
        self._lock = threading.Lock()
        self._jobs: Jobs | None = None
        self._pid = os.getpid()
        self._task_names: set[str] = set()
        self._connect()

    # -- public -----------------------------------------------------------------------

    @property
    def app(self) -> Any:
        """The Celery app the tasks are registered with."""
        return self._app

    @property
    def on_shutdown(self) -> OnShutdown:
        """`"cancel"` or `"wait"`: what a warm shutdown does to running jobs."""
        return self._on_shutdown

    @property
    def task_names(self) -> frozenset[str]:
        """The names of the tasks declared through
        [`task`][dbcancel.contrib.celery.CeleryJobs.task]."""
        return frozenset(self._task_names)

    @property
    def jobs(self) -> Jobs:
        """This process's [`Jobs`][dbcancel.Jobs], built on first use after each fork."""
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():
                if self._pid != os.getpid():
                    self._after_fork()
                self._jobs = Jobs(self._engine, self._model, **self._options)
            return self._jobs

    def task(
        self, **options: Any
    ) -> Callable[[Callable[Concatenate[Checkpoint, Any, P], R]], CancellableTask[P, R]]:
        """Declare a cancellable task: `@cancellable.task(**celery_options)`.

        The decorated body is called as `body(cp, job_id, *args, **kwargs)` inside
        `jobs.run(job_id)` (with `bind=True`: `body(task, cp, job_id, ...)`); the
        task is sent as `task.delay(job_id, *args, **kwargs)`. `options` are Celery's
        (`name`, `queue`, `autoretry_for`, `acks_late`, ...). See the module's
        documentation for what each delivery does by the state of the row.
        """
        bind = bool(options.pop("bind", False))

        def decorate(
            body: Callable[Concatenate[Checkpoint, Any, P], R],
        ) -> CancellableTask[P, R]:
            call: Callable[..., Any] = body

            @functools.wraps(body)
            def run(task: Any, job_id: Any, *args: Any, **kwargs: Any) -> Any:
                if bind:
                    return self._run(task, job_id, functools.partial(call, task), args, kwargs)
                return self._run(task, job_id, call, args, kwargs)

            if not run.__name__.isidentifier():  # a lambda: Celery compiles a def of it
                run.__name__ = run.__qualname__ = "cancellable_task"
            created: Any = self._app.task(bind=True, **options)(run)
            self._task_names.add(created.name)
            result: CancellableTask[P, R] = created
            return result

        return decorate

    def __repr__(self) -> str:
        return f"<CeleryJobs {self._model!r} on_shutdown={self._on_shutdown!r}>"

    # -- running a delivery -----------------------------------------------------------

    def _run(
        self,
        task: Any,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        jobs = self.jobs
        try:
            run = jobs.run(job_id)
            cp = run.__enter__()
        except InvalidTransition as err:
            self._not_runnable(task, jobs, job_id, err.current)
        except JobNotFound:
            # Cancelled and then deleted while the message was queued, most likely.
            log.warning(
                "dbcancel: task %s (%s) found no %s %r: nothing ran",
                task.name,
                task.request.id,
                jobs.model_name,
                job_id,
            )
            self._revoked(task, job_id, "deleted")
        if cp.cancelled:
            # Cancelled before this delivery: run() wrote nothing; neither shall we.
            run.__exit__(None, None, None)
            self._revoked(task, job_id, cp.reason)
        try:
            try:
                value = body(cp, job_id, *args, **kwargs)
            except BaseException as exc:
                if not run.__exit__(type(exc), exc, exc.__traceback__):
                    raise
                value = None
            else:
                run.__exit__(None, None, None)
        except Exception:
            if cp.cancelled:
                # An error raised because of the cancel (a socket closed by on_cancel,
                # say): the cancel wins, and no retry runs the job again.
                self._stopped(task, jobs, job_id, cp)
            raise
        if cp.cancelled:
            self._stopped(task, jobs, job_id, cp)
        return value

    def _stopped(self, task: Any, jobs: Jobs, job_id: Any, cp: Checkpoint) -> NoReturn:
        """Record a run that stopped on its checkpoint, by what the row says now."""
        try:
            status = jobs.status(job_id)
        except JobNotFound:  # cancelled, stopped, then deleted: the cancel-then-delete flow
            self._revoked(task, job_id, cp.reason or "deleted")
        if status is Status.CANCELLED:
            self._revoked(task, job_id, cp.reason)
        # Reaped or changed by hand while it ran: the row says failed.
        self._not_runnable(task, jobs, job_id, status.value)

    def _revoked(self, task: Any, job_id: Any, reason: str | None) -> NoReturn:
        request = task.request
        text = f"{self._model_name(job_id)} was cancelled" + (f": {reason}" if reason else "")
        if _records(task):
            task.backend.mark_as_revoked(request.id, text, request=request)
        raise Ignore(text)

    def _not_runnable(self, task: Any, jobs: Jobs, job_id: Any, status: str) -> NoReturn:
        if status == Status.CANCELLED.value:
            self._revoked(task, job_id, None)
        request = task.request
        if status != Status.IN_PROGRESS.value:
            exc = JobNotRunnable(jobs.model_name, job_id, status)
            if _records(task):
                task.backend.mark_as_failure(request.id, exc, request=request)
            raise Ignore(str(exc))
        log.warning(
            "dbcancel: task %s (%s) for %s %r found it %s: the body did not run again",
            task.name,
            request.id,
            jobs.model_name,
            job_id,
            status,
        )
        raise Ignore(f"{jobs.model_name} {job_id!r} is {status!r}")

    def _model_name(self, job_id: Any) -> str:
        name = getattr(self._model, "__name__", None) or getattr(self._model, "name", "job")
        return f"{name} {job_id!r}"

    # -- signals ----------------------------------------------------------------------

    def _connect(self) -> None:
        uid = f"dbcancel.contrib.celery:{id(self)}"
        signals.worker_process_init.connect(
            self._on_process_init, weak=False, dispatch_uid=f"{uid}:init"
        )
        signals.worker_shutting_down.connect(
            self._on_shutting_down, weak=False, dispatch_uid=f"{uid}:shutdown"
        )
        signals.task_revoked.connect(self._on_revoked, weak=False, dispatch_uid=f"{uid}:revoked")

    def _after_fork(self) -> None:
        # The pool's connections belong to the parent: forget them without closing them.
        self._engine.dispose(close=False)
        self._jobs = None
        self._pid = os.getpid()

    def _on_process_init(self, **_: Any) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            else:  # a child forked before this object noticed: same treatment
                self._engine.dispose(close=False)
                self._jobs = None

    def _on_shutting_down(self, **_: Any) -> None:
        if self._on_shutdown != "cancel":
            return
        from celery.worker import state

        ids = [
            request.args[0]
            for request in list(state.active_requests)
            if request.task_name in self._task_names and request.args
        ]
        if not ids:
            return
        # Called from a signal handler: the database work runs in a thread of its own,
        # which the interpreter waits for before it exits.
        thread = threading.Thread(
            target=self._cancel_all, args=(ids,), name="dbcancel-celery-shutdown"
        )
        thread.start()

    def _on_revoked(
        self, sender: Any = None, request: Any = None, expired: bool = False, **_: Any
    ) -> None:
        # Celery dropped the message (revoke(), or expires=): the job would stay pending.
        if getattr(sender, "name", None) not in self._task_names:
            return
        args = getattr(request, "args", None)
        if not args:
            return
        reason = REVOKED_REASON if not expired else EXPIRED_REASON
        thread = threading.Thread(
            target=self._cancel_all, args=([args[0]], reason), name="dbcancel-celery-revoked"
        )
        thread.start()

    def _cancel_all(self, ids: list[Any], reason: str = SHUTDOWN_REASON) -> None:
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


def _records(task: Any) -> bool:
    """Whether the task's results are stored: a result backend, and no `ignore_result`."""
    return not (task.ignore_result or isinstance(task.backend, DisabledBackend))
