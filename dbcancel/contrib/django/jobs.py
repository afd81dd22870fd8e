"""`DjangoJobs`: [`Jobs`][dbcancel.Jobs] on the Django ORM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel.jobs import Jobs

from .backend import DjangoBackend

__all__ = ["DjangoJobs"]


class DjangoJobs(Jobs):
    """Cancel, run and wait for the jobs of one Django model; the methods of
    [`Jobs`][dbcancel.Jobs].

    ```python
    jobs = DjangoJobs(Analysis, interval=0.5)          # using="default"
    with jobs.run(analysis.pk) as cp:                   # in the worker
        for path in files:
            cp()
            process(path)

    jobs.cancel(analysis.pk, where={"user_id": request.user.pk})
    jobs.wait(analysis.pk, timeout=10)
    ```

    `model` is a concrete subclass of
    [`CancellableModel`][dbcancel.contrib.django.models.CancellableModel] (or any model with its
    fields), or its `"app_label.ModelName"`; `using` the database alias;
    `watch`, `clock` and `max_staleness` as for [`Jobs`][dbcancel.Jobs]: by default one
    watcher thread per process and table polls every running job in one query per
    interval, through one Django connection of its own that it keeps (a dead one is
    replaced at the next poll), and on PostgreSQL with psycopg 3 it LISTENs for cancels,
    which are announced on the same channel as [`Jobs`][dbcancel.Jobs]' (a cancel through either
    wakes the watchers of both). `push`: a Redis URL to push cancels through instead, as
    for [`Jobs`][dbcancel.Jobs] (same channels: a push from either side wakes both).
    `watch=False`: each checkpoint polls its own row, in
    the worker's thread. `reap()` and `stats()` work as for [`Jobs`][dbcancel.Jobs]. Every status
    change is one conditional `filter(...).update(...)` committed in its own
    transaction before the method returns, so it refuses to run inside the caller's
    `transaction.atomic()` (`ATOMIC_REQUESTS` included). `where` filters name
    fields (`user`, `user_id`). Timestamps are `django.utils.timezone.now()`: aware
    UTC under `USE_TZ = True` (Django's default), as the SQLAlchemy side writes them.
    Liveness works as for [`Jobs`][dbcancel.Jobs]: each worker process beats its row of the
    [`Worker`][dbcancel.contrib.django.models.Worker] table every `heartbeat` seconds
    while it runs jobs (the app's migration creates that table), on the database's
    clock, and `reap()` stops the jobs of processes that stopped beating.

    Threads: a worker thread's connection to `using` is closed when its `run()`
    ends (in any thread but the main one), since Django only closes connections at the
    end of requests. Connections to other aliases, and those of threads that only
    cancel or wait, are the thread's to close (`django.db.connections.close_all()`).
    To join the status change to the results, call `cp.complete(alias)` inside
    `transaction.atomic(using=alias)`.

    `listen_url`: as for [`Jobs`][dbcancel.Jobs], a PostgreSQL URL straight to the
    server for the listener connection, when the alias reaches it through a pooler in
    transaction mode (PgBouncer); see [Fleets](fleets.md#pgbouncer).
    """

    def __init__(
        self,
        model: Any,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        using: str = DEFAULT_DB_ALIAS,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        listen_url: Any = None,
        push: str | None = None,
    ) -> None:
        self._setup(
            DjangoBackend(model, using),
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            listen_url=listen_url,
            push=push,
        )

    @property
    def _django(self) -> DjangoBackend:
        from dbcancel._push import unwrap

        backend = unwrap(self._backend)
        if not isinstance(backend, DjangoBackend):
            raise TypeError(
                f"this DjangoJobs was built on {type(backend).__name__}, not on a Django "
                "model; build it with DjangoJobs(Model, using=...)"
            )
        return backend

    @property
    def model(self) -> Any:
        """The job model class."""
        return self._django.model

    @property
    def using(self) -> str:
        """The database alias the jobs are read and written through."""
        return self._django.alias

    def __repr__(self) -> str:
        watch = "" if self.watch else " watch=False"
        return (
            f"<DjangoJobs {self.model_name} using={self.using!r} interval={self.interval}{watch}>"
        )
