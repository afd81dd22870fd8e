"""Dramatiq integration: actors whose first argument is a job id and whose body gets its
checkpoint.

```python
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import create_engine
from dbcancel.contrib.dramatiq import DramatiqJobs

dramatiq.set_broker(RabbitmqBroker(url="amqp://..."))
engine = create_engine(DATABASE_URL)
cancellable = DramatiqJobs(engine, Analysis, interval=0.5)

@cancellable.task(max_retries=3)
def analyse(cp, job_id, path):              # runs inside jobs.run(job_id)
    for chunk in read(path):
        cp()                                # raises Cancelled once cancelled
        process(chunk)

analyse.send(job_id, "/data/a.bin")         # the job id first, then your arguments
cancellable.jobs.cancel(job_id, reason="user deleted it")   # anywhere
```

The task is Dramatiq's own actor, run by `dramatiq your.module` in its worker threads:
each worker process builds its own [`Jobs`][dbcancel.Jobs] on first use (an engine
inherited across a fork is disposed with `engine.dispose(close=False)`), shared by its
threads, with one runtime thread and one heartbeat. Building a
[`DramatiqJobs`][dbcancel.contrib.dramatiq.DramatiqJobs] adds a middleware to the broker
(the global one, or `broker=`): it knows which message each thread runs, and cancels the
running jobs when the worker shuts down.

What each run of the actor does, by the state of the job's row:

* `pending`: the body runs inside `jobs.run(job_id)`. It returns: the job is `completed`.
  It raises: if Dramatiq's `Retries` middleware will retry the message (its
  `max_retries`, `retry_when` and `throws`, as the actor or message set them), the job
  goes back to `pending`, its `attempts` and the `error` kept, and the retry runs the body
  again; otherwise the job is `failed` and the message fails.
* `cancelled` (before or while the body ran, or between two attempts), or deleted: the
  body does not run (or stops at its next `cp()`); the actor raises
  [`JobCancelled`][dbcancel.JobCancelled], which is in the actor's `throws`, so the
  message fails without a retry.
* `failed`, `completed` or `in_progress` (the message delivered again for a job whose
  body already ran, or runs elsewhere): the body does not run; the actor raises
  [`JobNotRunnable`][dbcancel.JobNotRunnable], also never retried.

Warm shutdown (the first SIGTERM or SIGINT of `dramatiq`), with `on_shutdown="cancel"`
(the default): the jobs running in the worker process are cancelled with the reason
`"worker shutdown"`; they stop at their next checkpoint and end `cancelled`, and
Dramatiq requeues the messages its threads had not started. `"wait"`: Dramatiq's own
behaviour, the running messages finish first.

Importing this module needs Dramatiq: `pip install 'dbcancel[dramatiq]'`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

try:
    import dramatiq
    from dramatiq.middleware import Middleware, Retries
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.dramatiq needs Dramatiq, which is not installed: "
        "pip install 'dbcancel[dramatiq]'"
    ) from err

from dbcancel import Checkpoint, Jobs
from dbcancel._delivery import WORKER_SHUTDOWN_REASON, Delivery, Ending, OnShutdown
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel._options import DEFAULT_INTERVAL, Options, OptionsView
from dbcancel._sqla import resolve_engine
from dbcancel.errors import JobCancelled, JobNotRunnable

__all__ = ["SHUTDOWN_REASON", "DramatiqJobs"]

P = ParamSpec("P")
R = TypeVar("R")

SHUTDOWN_REASON = WORKER_SHUTDOWN_REASON
"""The cancel reason of the jobs a worker's warm shutdown stops (`on_shutdown="cancel"`):
`"worker shutdown"`, as in every task-queue integration."""

_NEVER_RETRIED = (JobCancelled, JobNotRunnable)


class DramatiqJobs(OptionsView):
    """Cancellable Dramatiq actors for the jobs of one table.

    `bind` is the SQLAlchemy Engine of the job table (or a sessionmaker bound to one)
    and `model` its mapped class (or Table), as for [`Jobs`][dbcancel.Jobs]; `interval`,
    `clock`, `watch`, `max_staleness`, `heartbeat`, `listen_url` and `push` are the
    options of `Jobs`, passed to the `Jobs` each worker process builds on first use, and
    read back as `Jobs` shows them (`watch` is the mode in effect). `on_shutdown` as for
    the other task queues: `"cancel"` or `"wait"`. `broker`: the Dramatiq broker the
    actors go to (default: `dramatiq.get_broker()`, when the first task is declared).
    """

    def __init__(
        self,
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
        broker: Any = None,
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
        self._model = model
        # Validate the model (and watch=True's listener) now, where the actors are declared.
        Jobs(engine, model, **self._options.kwargs())
        self._delivery: Delivery[Jobs] = Delivery(
            lambda: Jobs(engine, model, **self._options.kwargs()),
            dispose=lambda: engine.dispose(close=False),
            on_shutdown=on_shutdown,
        )
        self._broker = broker
        self._middleware: _Middleware | None = None

    @property
    def jobs(self) -> Jobs:
        """This process's [`Jobs`][dbcancel.Jobs], built on first use after each fork."""
        return self._delivery.jobs

    @property
    def on_shutdown(self) -> OnShutdown:
        """`"cancel"` or `"wait"`: what a warm shutdown does to running jobs."""
        return self._delivery.on_shutdown

    def task(self, **options: Any) -> Callable[[Callable[Concatenate[Checkpoint, Any, P], R]], Any]:
        """Declare a cancellable actor: `@cancellable.task(**actor_options)`.

        The decorated body is called as `body(cp, job_id, *args, **kwargs)` inside
        `jobs.run(job_id)`; the actor is sent as `actor.send(job_id, *args, **kwargs)`.
        `options` are those of `dramatiq.actor` (`actor_name`, `queue_name`,
        `max_retries`, `min_backoff`, `retry_when`, `throws`, ...);
        [`JobCancelled`][dbcancel.JobCancelled] and
        [`JobNotRunnable`][dbcancel.JobNotRunnable] join `throws`, so that a cancelled
        job's message is never retried. Returns Dramatiq's `Actor`.
        """
        broker = self._broker if self._broker is not None else dramatiq.get_broker()
        middleware = self._install(broker)
        throws = options.pop("throws", None) or ()
        if not isinstance(throws, tuple):
            throws = (throws,)
        options["throws"] = (*_NEVER_RETRIED, *throws)

        def decorate(body: Callable[Concatenate[Checkpoint, Any, P], R]) -> Any:
            if inspect.iscoroutinefunction(body):
                raise TypeError(
                    f"{body.__qualname__} is async: cancellable tasks run their body inside "
                    "jobs.run(), which needs a plain function; make it a def"
                )

            @functools.wraps(body)
            def run(job_id: Any, /, *args: Any, **kwargs: Any) -> Any:
                return self._run(middleware, broker, job_id, body, args, kwargs)

            make: Any = dramatiq.actor
            return make(run, broker=broker, **options)

        return decorate

    def __repr__(self) -> str:
        return f"<DramatiqJobs {self._model!r} on_shutdown={self.on_shutdown!r}>"

    def _install(self, broker: Any) -> _Middleware:
        if self._middleware is None:
            self._middleware = _Middleware(self._delivery)
            broker.add_middleware(self._middleware)
        return self._middleware

    def _run(
        self,
        middleware: _Middleware,
        broker: Any,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        message = middleware.message()
        outcome = self._delivery.deliver(
            job_id,
            body,
            args,
            kwargs,
            retry_if=functools.partial(_retries, broker, message),
        )
        ending = outcome.ending
        if ending is Ending.COMPLETED:
            return outcome.value
        if ending in (Ending.FAILED, Ending.RETRY):
            assert outcome.error is not None
            raise outcome.error
        raise outcome.exception() from outcome.error


class _Middleware(Middleware):
    """Which message each worker thread runs, and the warm shutdown of a worker."""

    def __init__(self, delivery: Delivery[Jobs]) -> None:
        self._delivery = delivery
        self._local = threading.local()

    def message(self) -> Any:
        return getattr(self._local, "message", None)

    def before_process_message(self, broker: Any, message: Any) -> None:
        self._local.message = message

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self._local.message = None

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self._local.message = None

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Dramatiq requeues what its threads have not started: nothing to defer.
        self._delivery.begin_shutdown(defer=False, reason=SHUTDOWN_REASON)


def _retries(broker: Any, message: Any, exc: BaseException) -> bool:
    """True when Dramatiq's `Retries` middleware will retry `message` after `exc`: the
    same decision it makes once the actor has raised."""
    retries_mw = next((m for m in broker.middleware if isinstance(m, Retries)), None)
    if retries_mw is None or message is None:
        return False
    actor = broker.get_actor(message.actor_name)
    throws = message.options.get("throws") or actor.options.get("throws")
    if throws and isinstance(exc, throws):
        return False
    retries = message.options.get("retries", 0)
    retry_when = actor.options.get("retry_when", retries_mw.retry_when)
    if retry_when is not None:
        return bool(retry_when(retries, exc))
    limit = message.options.get("max_retries", actor.options.get("max_retries"))
    if limit is None:
        limit = retries_mw.max_retries
    return bool(limit is None or retries < limit)
