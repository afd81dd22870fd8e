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
  job is `failed` and the exception goes to Celery as usual (FAILURE).
* A retry, whether `autoretry_for` sends it or a bound body's `task.retry()`: the job
  goes back to `pending` (its `attempts` count and the `error` that caused the retry
  kept) before Celery sends the retry, which runs the body again; Celery records RETRY.
  Once `max_retries` is spent, the last error fails the job. A job cancelled before the
  retry was asked for is not retried: REVOKED.
* `cancelled` (before or while the body ran, including an exception the body raised
  after the cancel, or between two attempts), or deleted: the body does not run (or
  stops at its next `cp()`), Celery records REVOKED (the result raises
  `TaskRevokedError` with the cancel reason) and the task neither succeeds nor retries.
* `failed` or `completed` (a duplicate delivery): the body does not run; Celery
  records FAILURE with [`JobNotRunnable`][dbcancel.JobNotRunnable] for this delivery.
* `in_progress` (a duplicate delivery while another worker runs it, or one whose
  worker died and that `reap()` will settle): the body does not run, a warning is
  logged, and nothing is recorded: the running attempt records its own result.
* Any state, after this node's warm shutdown began (a prefetched message in the threads
  or solo pool): the job does not start; the message goes back to the broker (rejected
  with requeue under `acks_late`, sent again as itself otherwise) for another node.

Results go to whatever result backend the app has; with none, or `ignore_result=True`,
nothing is recorded and such deliveries end as Celery's `Ignore` does.

Importing this module needs Celery: `pip install 'dbcancel[celery]'`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, Concatenate, Generic, NoReturn, ParamSpec, Protocol, TypeVar

try:
    from celery import signals
    from celery.backends.base import DisabledBackend
    from celery.exceptions import Ignore, Reject, Retry
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.celery needs Celery, which is not installed: "
        "pip install 'dbcancel[celery]'"
    ) from err

from dbcancel import Checkpoint, JobId, Jobs
from dbcancel._delivery import WORKER_SHUTDOWN_REASON, Delivery, Ending, OnShutdown, Outcome
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel._options import DEFAULT_INTERVAL, Options, OptionsView
from dbcancel._sqla import resolve_engine
from dbcancel.checkpoint import current
from dbcancel.errors import JobCancelled, JobNotRunnable

__all__ = [
    "EXPIRED_REASON",
    "REVOKED_REASON",
    "SHUTDOWN_REASON",
    "CancellableTask",
    "CeleryJobs",
    "JobCancelled",
    "JobNotRunnable",
]

log = logging.getLogger("dbcancel")

P = ParamSpec("P")
R = TypeVar("R", covariant=True)

SHUTDOWN_REASON = WORKER_SHUTDOWN_REASON
"""The cancel reason of the jobs a warm shutdown stops (`on_shutdown="cancel"`):
`"worker shutdown"`, the same in every task-queue integration. (The process-wide
[`dbcancel.shutdown`][dbcancel.shutdown] says `"shutdown"`.)"""

REVOKED_REASON = "revoked in Celery"
"""The cancel reason of a job whose task Celery revoked (`AsyncResult.revoke()`)."""

EXPIRED_REASON = "expired in Celery"
"""The cancel reason of a job whose task expired before it ran (`expires=`)."""


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


class CeleryJobs(OptionsView):
    """Cancellable Celery tasks for the jobs of one table.

    `app` is the Celery app, `bind` the SQLAlchemy Engine of the job table (or a
    sessionmaker bound to one) and `model` its mapped class (or Table), as for
    [`Jobs`][dbcancel.Jobs]; `interval`, `clock`, `watch`, `max_staleness`, `heartbeat`,
    `listen_url` and `push` (the broker's Redis URL, say) are the options of `Jobs`,
    passed to the `Jobs` that each worker process builds for itself on first use, and read
    back as `Jobs` shows them (`watch` is the mode in effect).

    `on_shutdown`: what a warm shutdown (SIGTERM) of a worker node does to the jobs it
    runs. `"cancel"` (the default) cancels them with the reason
    [`SHUTDOWN_REASON`][dbcancel.contrib.celery.SHUTDOWN_REASON]: they stop at their next
    checkpoint (within `interval` in a prefork child; at once in the threads and solo
    pools), end `cancelled` with Celery's state REVOKED, and the node exits. `"wait"` keeps
    Celery's own behaviour: the node finishes its running tasks before it exits. Either
    way, a delivery that reaches a task after the warm shutdown began does not start its
    job: its message goes back to the broker, for another node.
    """

    def __init__(
        self,
        app: Any,
        bind: Any,
        model: Any,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        listen_url: Any = None,
        push: str | None = None,
        on_shutdown: OnShutdown = "cancel",
    ) -> None:
        engine = resolve_engine(bind)
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
        self._app = app
        self._engine = engine
        self._model = model
        # Validate the model (and watch=True's listener) now, in the process that
        # declares the tasks.
        Jobs(engine, model, **self._options.kwargs())
        self._delivery: Delivery[Jobs] = Delivery(
            lambda: Jobs(engine, model, **self._options.kwargs()),
            # The pool's connections belong to the parent: forget them without closing.
            dispose=lambda: engine.dispose(close=False),
            on_shutdown=on_shutdown,
        )
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
        return self._delivery.on_shutdown

    @property
    def task_names(self) -> frozenset[str]:
        """The names of the tasks declared through
        [`task`][dbcancel.contrib.celery.CeleryJobs.task]."""
        return frozenset(self._task_names)

    @property
    def jobs(self) -> Jobs:
        """This process's [`Jobs`][dbcancel.Jobs], built on first use after each fork."""
        return self._delivery.jobs

    def task(
        self, **options: Any
    ) -> Callable[[Callable[Concatenate[Checkpoint, Any, P], R]], CancellableTask[P, R]]:
        """Declare a cancellable task: `@cancellable.task(**celery_options)`.

        The decorated body is called as `body(cp, job_id, *args, **kwargs)` inside
        `jobs.run(job_id)` (with `bind=True`: `body(task, cp, job_id, ...)`); the
        task is sent as `task.delay(job_id, *args, **kwargs)`. `options` are Celery's
        (`name`, `queue`, `autoretry_for`, `max_retries`, `acks_late`, `base`, ...).
        A retry (`autoretry_for`, or `task.retry()` in a bound body) moves the job back
        to `pending` before Celery sends it, unless the job was cancelled meanwhile.
        See the module's documentation for what each delivery does by the state of the
        row.
        """
        bind = bool(options.pop("bind", False))
        base = options.pop("base", None) or self._app.Task
        delivery = self._delivery
        # A retry() that moves the row back to pending before Celery sends the retry.
        options["base"] = type(base.__name__, (_RetryFirst, base), {"_dbcancel": delivery})

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
        return f"<CeleryJobs {self._model!r} on_shutdown={self.on_shutdown!r}>"

    # -- running a delivery -----------------------------------------------------------

    def _run(
        self,
        task: Any,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        outcome = self._delivery.deliver(
            job_id, body, args, kwargs, retry_if=functools.partial(_autoretries, task)
        )
        ending = outcome.ending
        if ending is Ending.COMPLETED:
            return outcome.value
        if ending in (Ending.FAILED, Ending.RETRY):
            assert outcome.error is not None
            raise outcome.error
        if ending is Ending.CANCELLED:
            self._revoked(task, outcome)
        if ending is Ending.DEFERRED:
            self._defer(task, job_id, args, kwargs)
        return self._not_runnable(task, outcome)

    def _revoked(self, task: Any, outcome: Outcome) -> NoReturn:
        request = task.request
        text = str(outcome.exception())
        if _records(task):
            task.backend.mark_as_revoked(request.id, text, request=request)
        raise Ignore(text)

    def _not_runnable(self, task: Any, outcome: Outcome) -> NoReturn:
        request = task.request
        if outcome.ending is Ending.NOT_RUNNABLE:
            exc = outcome.exception()
            if _records(task):
                task.backend.mark_as_failure(request.id, exc, request=request)
            raise Ignore(str(exc))
        log.warning(
            "dbcancel: task %s (%s) for %s %r found it %s: the body did not run again",
            task.name,
            request.id,
            outcome.model,
            outcome.job_id,
            outcome.status,
        )
        raise Ignore(f"{outcome.model} {outcome.job_id!r} is {outcome.status!r}")

    def _defer(
        self, task: Any, job_id: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> NoReturn:
        """Hand a delivery that came after the warm shutdown began back to the broker."""
        log.info(
            "dbcancel: task %s (%s) for %s %r arrived during the warm shutdown of this "
            "node: not started, its message goes back to the broker",
            task.name,
            task.request.id,
            self._delivery.jobs.model_name,
            job_id,
        )
        if task.acks_late:
            # Not acknowledged yet: the broker gives it to another node.
            raise Reject("worker shutting down", requeue=True)
        # Acknowledged when it was received: send it again, as itself (same id,
        # arguments, retries and queue), for another node to take.
        request = task.request
        task.signature_from_request(request, (job_id, *args), kwargs).apply_async()
        raise Ignore("worker shutting down: sent back to the broker")

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

    def _on_process_init(self, **_: Any) -> None:
        self._delivery.after_fork()

    def _on_shutting_down(self, **_: Any) -> None:
        from celery.worker import state

        ids = [
            request.args[0]
            for request in list(state.active_requests)
            if request.task_name in self._task_names and request.args
        ]
        # Called from a signal handler: the database work runs in a thread of its own,
        # which the interpreter waits for before it exits.
        self._delivery.begin_shutdown(ids, reason=SHUTDOWN_REASON)

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
            target=self._delivery.cancel_all,
            args=([args[0]], reason),
            name="dbcancel-celery-revoked",
        )
        thread.start()


class _RetryFirst:
    """Mixed into the task class: `task.retry()` moves the job's row back to `pending`
    before Celery sends the retry, so that the retry finds it startable, and sends
    nothing for a job cancelled meanwhile (the cancel wins)."""

    _dbcancel: Delivery[Jobs]

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        task: Any = self
        request = task.request
        job_id = request.args[0] if request.args else None
        max_retries = kwargs.get("max_retries")
        limit = task.max_retries if max_retries is None else max_retries
        sent = not request.called_directly and (limit is None or request.retries < limit)
        if sent and job_id is not None:
            moved = self._dbcancel.retry(job_id, kwargs.get("exc"))
            if moved is False:
                # Cancelled meanwhile: no retry. The checkpoint raises the cancel, which
                # the run swallows; the delivery records REVOKED.
                cp = current()
                assert cp is not None
                raise cp._exception()
        return super().retry(*args, **kwargs)  # type: ignore[misc]


def _autoretries(task: Any, exc: BaseException) -> bool:
    """True when Celery's `autoretry_for` will send a retry after `exc` (the wrapper
    it puts around the task calls `task.retry()` once the run has ended)."""
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not autoretry_for or isinstance(exc, (Ignore, Retry, Reject)):
        return False
    dont = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    if (dont and isinstance(exc, dont)) or not isinstance(exc, autoretry_for):
        return False
    request = task.request
    if request.called_directly:
        return False
    retry_kwargs = getattr(task, "retry_kwargs", None) or {}
    limit = retry_kwargs.get("max_retries", task.max_retries)
    return bool(limit is None or request.retries < limit)


def _records(task: Any) -> bool:
    """Whether the task's results are stored: a result backend, and no `ignore_result`."""
    return not (task.ignore_result or isinstance(task.backend, DisabledBackend))
