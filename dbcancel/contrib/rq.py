"""RQ integration: job functions whose first argument is a job id and whose body gets its
checkpoint.

```python
from redis import Redis
from rq import Queue, Retry
from sqlalchemy import create_engine
from dbcancel.contrib.rq import RQJobs

engine = create_engine(DATABASE_URL)
cancellable = RQJobs(engine, Analysis, interval=0.5)

@cancellable.task()
def analyse(cp, job_id, path):              # runs inside jobs.run(job_id)
    for chunk in read(path):
        cp()                                # raises Cancelled once cancelled
        process(chunk)

queue = Queue("analysis", connection=Redis())
queue.enqueue(analyse, job_id, "/data/a.bin", retry=Retry(max=3))   # the job id first
cancellable.jobs.cancel(job_id, reason="user deleted it")             # anywhere
```

`rq worker` runs each RQ job in a work horse, a child it forks for that job alone: the
horse builds its own [`Jobs`][dbcancel.Jobs] on first use (an engine inherited from the
worker is disposed with `engine.dispose(close=False)`, never shared), its own runtime
thread, its own heartbeat and worker row. The same holds for `SimpleWorker` (no fork:
one `Jobs` for the worker's process) and `SpawnWorker`.

What each run of the function does, by the state of the job's row:

* `pending`: the body runs inside `jobs.run(job_id)`. It returns: the job is `completed`
  and RQ's job FINISHED with the return value. It raises: the job is `failed` and RQ's
  job FAILED with that exception, unless the RQ job has retries left (`retry=Retry(...)`):
  then the row goes back to `pending` (its `attempts` and the `error` kept) before RQ
  requeues it, and the next run calls the body again.
* `cancelled` (before or while the body ran, or between two attempts), or deleted: the
  body does not run (or stops at its next `cp()`), and RQ's job is FAILED with
  [`JobCancelled`][dbcancel.JobCancelled], its retries dropped: a cancelled job is never
  retried.
* `failed`, `completed` or `in_progress` (enqueued again for a job whose body already ran,
  or runs elsewhere): the body does not run and RQ's job is FAILED with
  [`JobNotRunnable`][dbcancel.JobNotRunnable], without retries.

Warm shutdown: `rq worker` waits for the running job on its first SIGTERM (RQ's own
behaviour, which this integration keeps); a second signal, or SIGKILL, kills the horse,
and `reap()` fails its job with `worker lost`.

Importing this module needs RQ: `pip install 'dbcancel[rq]'`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

try:
    from rq import get_current_job
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.rq needs RQ, which is not installed: pip install 'dbcancel[rq]'"
    ) from err

from dbcancel import Checkpoint, Jobs
from dbcancel._delivery import Delivery, Ending
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel._options import DEFAULT_INTERVAL, Options, OptionsView
from dbcancel._sqla import resolve_engine

__all__ = ["RQJobs"]

P = ParamSpec("P")
R = TypeVar("R")


class RQJobs(OptionsView):
    """Cancellable RQ job functions for the jobs of one table.

    `bind` is the SQLAlchemy Engine of the job table (or a sessionmaker bound to one)
    and `model` its mapped class (or Table), as for [`Jobs`][dbcancel.Jobs]; `interval`,
    `clock`, `watch`, `max_staleness`, `heartbeat`, `listen_url` and `push` are the
    options of `Jobs`, passed to the `Jobs` each process (each work horse) builds on first
    use, and read back as `Jobs` shows them (`watch` is the mode in effect).
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
        self._model = model
        # Validate the model (and watch=True's listener) now, where the tasks are declared.
        Jobs(engine, model, **self._options.kwargs())
        self._delivery: Delivery[Jobs] = Delivery(
            lambda: Jobs(engine, model, **self._options.kwargs()),
            # A horse inherits the worker's pool: forget it without closing it.
            dispose=lambda: engine.dispose(close=False),
        )

    @property
    def jobs(self) -> Jobs:
        """This process's [`Jobs`][dbcancel.Jobs], built on first use (and again in each
        forked work horse)."""
        return self._delivery.jobs

    def task(
        self,
    ) -> Callable[[Callable[Concatenate[Checkpoint, Any, P], R]], Callable[Concatenate[Any, P], R]]:
        """Declare a cancellable job function: `@cancellable.task()`.

        The decorated body is called as `body(cp, job_id, *args, **kwargs)` inside
        `jobs.run(job_id)`; the function RQ imports and calls takes the job id first:
        `queue.enqueue(analyse, job_id, *args, **kwargs)`, with RQ's own options
        (`retry=Retry(max=3)`, `job_timeout`, ...). Define it at module level, where RQ's
        worker imports it by name. See the module's documentation for what each run does
        by the state of the row.
        """

        def decorate(
            body: Callable[Concatenate[Checkpoint, Any, P], R],
        ) -> Callable[Concatenate[Any, P], R]:
            if inspect.iscoroutinefunction(body):
                raise TypeError(
                    f"{body.__qualname__} is async: cancellable tasks run their body inside "
                    "jobs.run(), which needs a plain function; make it a def"
                )

            @functools.wraps(body)
            def run(job_id: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
                result: R = self._run(job_id, body, args, kwargs)
                return result

            return run

        return decorate

    def __repr__(self) -> str:
        return f"<RQJobs {self._model!r}>"

    def _run(
        self,
        job_id: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        outcome = self._delivery.deliver(job_id, body, args, kwargs, retry_if=_retries)
        ending = outcome.ending
        if ending is Ending.COMPLETED:
            return outcome.value
        if ending in (Ending.FAILED, Ending.RETRY):
            assert outcome.error is not None
            raise outcome.error
        # Cancelled, or not runnable: RQ must not retry it.
        current = get_current_job()
        if current is not None:
            current.retries_left = 0
        raise outcome.exception() from outcome.error


def _retries(exc: BaseException) -> bool:
    """True when RQ will requeue the current job after `exc` (it has retries left)."""
    current = get_current_job()
    return bool(current is not None and current.should_retry)
