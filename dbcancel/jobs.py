"""`Jobs`: request, run and wait for cancellable jobs stored in one table.

`Jobs` is the two sides together, built on one backend: the client side
(`dbcancel._client`: cancel, status, wait, reap) and the worker side
(`dbcancel._worker`: run and the checkpoints), plus the options and `stats()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from ._events import table_of
from ._health import Health, health_for
from ._liveness import DEFAULT_HEARTBEAT
from ._options import DEFAULT_INTERVAL, Options
from ._push import with_push
from ._runtime import runtime
from ._worker import JobRun, JobsWorker
from .backend import Backend, check_backend

if TYPE_CHECKING:
    from ._async import AsyncJobRun, AsyncJobs

__all__ = ["AsyncJobRun", "AsyncJobs", "JobRun", "Jobs", "JobsStats"]


def __getattr__(name: str) -> Any:
    # AsyncJobs runs on SQLAlchemy's asyncio extension: imported when asked for, so that
    # the core imports no ORM.
    if name in ("AsyncJobs", "AsyncJobRun"):
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, slots=True)
class JobsStats:
    """What this process has done for one job table, from [`Jobs.stats`][dbcancel.Jobs.stats].

    Counters cover every `Jobs` of the table in this process since it started (or
    forked), checkpoints and watcher together.
    """

    active_jobs: int
    """Jobs of the table running in this process now."""
    watching: bool
    """True while a watcher thread serves the table in this process."""
    listening: bool
    """True while notifications really reach this process: the watcher's PostgreSQL
    LISTEN connection is open and has received the probe it sent itself through the
    engine after its LISTEN; with `push`, while the table's Redis channel is subscribed
    on the process's live Redis connection. False while polling alone (no listener, one
    that is reconnecting, or one behind a pooler in transaction mode: see `listen_url`)."""
    polls: int
    """Status queries made (by checkpoints and by the watcher; one per batch)."""
    poll_errors: int
    """Status queries that failed."""
    notifications: int
    """PostgreSQL notifications (with `push`, Redis messages) the watcher received."""
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
    restarts: int = 0
    """Times this process's runtime thread was found dead and started again (it serves
    every table; see [`dbcancel.shutdown`][dbcancel.shutdown])."""
    connections: int = 0
    """Connections dbcancel's runtime holds open now in this process for the table's
    database: its listener connection (one for all the database's tables) plus the
    connection a poll, heartbeat or probe has checked out (at most one at a time). The
    application's own connections (its transactions, and the job's start and end,
    written from the job's thread through the engine) are not counted."""


class Jobs(JobsWorker):
    """Cancel, run and wait for the jobs of one table.

    ```python
    jobs = Jobs(engine, Analysis, interval=0.5)
    with jobs.run(analysis_id) as cp:     # in the worker
        for path in files:
            cp()
            process(path)

    jobs.cancel(analysis_id, where={"user_id": uid})   # anywhere, any process
    ```

    `bind` is an Engine or a sessionmaker bound to one; `model` a mapped class using
    [`CancellableMixin`][dbcancel.CancellableMixin] (or a Table with the same columns).
    `interval` is the number of seconds of `clock` (default `time.monotonic`) between two
    polls of a running job's row. Every status change is one conditional UPDATE, committed
    before the method returns.

    The watched mode (the default): one background watcher per process and table polls
    every running job of the table in one statement per interval, listens for cancel
    notifications on PostgreSQL (with psycopg 3; other drivers are polled), and `cp()`
    only reads a flag. It polls on real time, so a custom `clock` makes the default
    threadless. `watch=False`, the threadless mode: each `cp()` reads the clock and
    polls its own row when a poll is due (for tests driven by a fake clock, and servers
    that forbid threads). `watch=True` insists on the watched mode: it refuses a custom
    clock, and a PostgreSQL engine it cannot listen through. `max_staleness`: seconds
    without a successful poll after which a running job is cancelled locally (fail
    closed); by default a database outage never stops a job (fail open).

    `listen_url` (PostgreSQL): a URL (str or SQLAlchemy `URL`) straight to the server
    for the listener connection alone, when the engine reaches the server through a
    pooler in transaction mode such as PgBouncer, where LISTEN does not work; polls,
    heartbeats and status changes still go through the engine. See
    [Fleets](fleets.md#pgbouncer).

    `push`: a Redis URL (`"redis://127.0.0.1:6379/0"`) to push cancels through instead
    of PostgreSQL's LISTEN, so that a fleet of processes needs no listener connection to
    the database at all (see [Fleets](fleets.md#push-past-the-connection-limit)); the row
    stays the truth and polling the safety net.
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
        from ._sqla import SQLAlchemyBackend  # raises naming the extra when it is missing

        self._setup(
            SQLAlchemyBackend(bind, model),
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            listen_url=listen_url,
            push=push,
        )

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        push: str | None = None,
    ) -> Self:
        """A `Jobs` on `backend`, an implementation of
        [`dbcancel.backend.Backend`][dbcancel.backend.Backend].

        ```python
        jobs = Jobs.from_backend(MyBackend(connection_factory, "analysis"))
        ```

        For an ORM or driver dbcancel does not ship a backend for; the options are those
        of [`Jobs`][dbcancel.Jobs], and every method works as it does there. `Jobs(engine,
        Model)` is `Jobs.from_backend` on dbcancel's SQLAlchemy backend, and
        [`DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs] on its Django one. Raises
        `TypeError` naming the members `backend` lacks.
        """
        jobs = cls.__new__(cls)
        jobs._setup(
            backend,
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            push=push,
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
        listen_url: Any = None,
        push: str | None = None,
    ) -> None:
        """What every way of building a `Jobs` shares: check the options, keep the backend."""
        check_backend(backend)
        dsn: str | None = None
        direct: Any = getattr(backend, "listen_directly", None)
        if listen_url is not None:
            from ._pg import listen_dsn

            dsn = listen_dsn(listen_url)  # raises on a bad value: nothing is opened
            if not callable(direct):
                raise TypeError(
                    f"listen_url needs a backend that can listen through its own "
                    f"connection; {type(backend).__name__} cannot"
                )
        options = Options.checked(
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            push=push,
        )
        self._push = options.push
        self._listen_url = listen_url
        backend = with_push(backend, options.push)
        self._interval, self._max_staleness = options.interval, options.max_staleness
        self._heartbeat_period = options.heartbeat
        self._given_clock = clock
        if dsn is not None:
            direct(dsn)  # raises for a database other than PostgreSQL
        if watch:
            backend.listener()  # refuses a PostgreSQL engine it could not listen through
        self._watch = options.watched
        self._clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self._backend = backend
        # Found by the table's key, which the backend may have to ask the database for:
        # at the first run or cancel (see the _health property), not here.
        self._table_health: Health | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def _health(self) -> Health:
        """The poll counters and outages of this table in this process, shared by every
        `Jobs` of the table (found by its key on first use)."""
        health = self._table_health
        if health is None:
            health = self._table_health = health_for(
                self._backend.key, self._backend.label, table_of(self._backend)
            )
        return health

    @_health.setter
    def _health(self, health: Health) -> None:
        self._table_health = health

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
    def clock(self) -> Callable[[], float] | None:
        """The clock the checkpoints read; None for `time.monotonic`."""
        return self._given_clock

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a successful poll after which running jobs are cancelled
        locally; None when they keep running through an outage."""
        return self._max_staleness

    @property
    def push(self) -> str | None:
        """The Redis URL cancels are pushed through; None for PostgreSQL's LISTEN
        (where the driver can) and polling."""
        return self._push

    @property
    def listen_url(self) -> Any:
        """The URL of the listener's own connection to PostgreSQL, as given; None when
        the listener connects through the engine (or the alias) like everything else."""
        return self._listen_url

    def __repr__(self) -> str:
        watch = "" if self._watch else " watch=False"
        return f"<Jobs {self.model_name} interval={self._interval}{watch}>"

    def stats(self) -> JobsStats:
        """Counters and state of this process's polling of this table; see JobsStats."""
        h = self._health
        rt = runtime()
        watching, listening, beats, beat_errors = rt.table_stats(self._backend)
        polls, errors, notifications, listener_errors, last_outage = h.snapshot()
        return JobsStats(
            active_jobs=len(self.active()),
            watching=watching,
            listening=listening,
            polls=polls,
            poll_errors=errors,
            notifications=notifications,
            listener_errors=listener_errors,
            outage=h.outage(),
            last_outage=last_outage,
            heartbeats=beats,
            heartbeat_errors=beat_errors,
            restarts=rt.restarts,
            connections=rt.connections(self._backend),
        )
