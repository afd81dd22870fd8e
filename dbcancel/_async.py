"""`AsyncJobs`: [`Jobs`][dbcancel.Jobs] for asyncio, on a SQLAlchemy `AsyncEngine`.

The same table, states, transitions and guarantees as `Jobs`, every database round
trip awaited on the loop (asyncpg or psycopg on PostgreSQL, aiosqlite, aiomysql on
MySQL/MariaDB), the polls, heartbeats and LISTEN of the running jobs done by tasks of
the loop (`dbcancel._aio_runtime`), and `cp()` a flag check with no I/O.

It is the synchronous logic itself, not a copy: the client and worker steps of `Jobs`
(`dbcancel._client`, `dbcancel._worker`) and the SQLAlchemy backend's statements run
through SQLAlchemy's greenlet bridge on the `AsyncEngine`'s driver. Keys, channels and
the registry of running jobs are therefore those of a `Jobs` on the same table: a
`jobs.cancel()` of either, in this process, flips the other's checkpoint at once, and
their notifications wake each other's listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

try:
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
    from sqlalchemy.util import greenlet_spawn
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "AsyncJobs runs on SQLAlchemy's asyncio extension, which needs greenlet and an "
        "async driver: pip install 'dbcancel[asyncio]'"
    ) from err

from . import _events
from ._aio import MAX_WAIT_POLL, _call_soon, check_timeout, wait_stopped
from ._aio_runtime import current_loop_runtime, loop_runtime
from ._client import JobsClient, check_seconds
from ._events import table_of
from ._health import Health, health_for
from ._liveness import DEFAULT_HEARTBEAT
from ._options import Options
from ._sqla import SQLAlchemyBackend
from ._worker import JobsWorker
from .backend import start_change, utcnow
from .checkpoint import CallbackHandle, Checkpoint, _pop, _push
from .errors import Cancelled, DbcancelError, InvalidTransition, UsageError
from .jobs import JobsStats
from .models import JobId, Status
from .registry import ActiveJob, registry

__all__ = ["AsyncJobRun", "AsyncJobs"]


def _async_engine(bind: Any) -> AsyncEngine:
    if isinstance(bind, AsyncEngine):
        return bind
    if isinstance(bind, async_sessionmaker):
        engine = bind.kw.get("bind")
        if isinstance(engine, AsyncEngine):
            return engine
        raise TypeError(
            "the async_sessionmaker passed to AsyncJobs has no AsyncEngine bind; pass the "
            "AsyncEngine"
        )
    raise TypeError(
        f"AsyncJobs needs an AsyncEngine (create_async_engine) or an async_sessionmaker "
        f"bound to one, got {type(bind).__name__}; a synchronous Engine goes to Jobs"
    )


class _Core(JobsWorker):
    """The synchronous client and worker logic, driven from the loop through the
    greenlet bridge: what the checkpoints of `AsyncJobs` call back into."""

    def __init__(
        self,
        backend: SQLAlchemyBackend,
        *,
        interval: float,
        max_staleness: float | None,
        heartbeat: float,
    ) -> None:
        self._backend = backend
        self._interval = interval
        self._max_staleness = max_staleness
        self._heartbeat_period = heartbeat
        self._clock = time.monotonic
        self._watch = True
        self._table_health: Health | None = None

    @property
    def _health(self) -> Health:
        health = self._table_health
        if health is None:
            health = self._table_health = health_for(
                self._backend.key, self._backend.label, table_of(self._backend)
            )
        return health

    @_health.setter
    def _health(self, health: Health) -> None:
        self._table_health = health

    def _leave_heartbeat(self) -> None:
        loop_runtime().leave(self._backend, self._heartbeat_period)

    def _runtime_add(self, cp: Checkpoint) -> None:
        loop_runtime().watch(self._backend, self._health, cp)

    def _runtime_remove(self, cp: Checkpoint) -> None:
        loop_runtime().unwatch(self._backend, cp)

    def _beat_due(self) -> None:
        """The loop's task beats: nothing for a checkpoint to do."""

    def _poll_rows(self, job_ids: Any) -> Any:
        raise DbcancelError(
            f"cp.poll() of a {self.model_name} job of AsyncJobs would run a round trip on "
            "the event loop; the loop's runtime polls it already (await jobs.status(job_id) "
            "reads the row)"
        )

    def _complete_in(self, job_id: Any, using: Any) -> tuple[Status | None, str | None] | None:
        if type(using).__module__.startswith("sqlalchemy.ext.asyncio"):
            raise TypeError(
                f"{self.model_name} {job_id!r}: cp.complete() takes a synchronous Session; "
                "with an AsyncSession or AsyncConnection, await cp.acomplete(session). "
                "Nothing was changed"
            )
        return super()._complete_in(job_id, using)

    async def _acomplete(self, cp: Checkpoint, using: Any) -> None:
        sync = getattr(using, "sync_session", None) or getattr(using, "sync_connection", None)
        if sync is None:
            raise TypeError(
                f"cp.acomplete() takes the AsyncSession or AsyncConnection in which the "
                f"worker wrote its results, got {type(using).__name__}; nothing was changed"
            )
        await greenlet_spawn(cp.complete, sync)


class AsyncJobs:
    """Cancel, run and wait for the jobs of one table from asyncio code.

    ```python
    engine = create_async_engine("postgresql+asyncpg://...")
    jobs = AsyncJobs(engine, Analysis, interval=0.5)

    async with jobs.run(analysis_id) as cp:      # in a task
        for path in files:
            cp()                                  # a flag check: no I/O, no await
            await process(path)

    await jobs.cancel(analysis_id, where={"user_id": uid})   # anywhere, any process
    await jobs.wait(analysis_id, timeout=10)
    ```

    `bind` is an `AsyncEngine` or an `async_sessionmaker` bound to one; `model`, `interval`,
    `max_staleness`, `heartbeat` and `listen_url` are those of [`Jobs`][dbcancel.Jobs], and
    so are the table, its states and transitions (one conditional UPDATE each) and every method's
    meaning, awaited. Drivers: asyncpg or psycopg (`postgresql+psycopg://`) on PostgreSQL,
    aiosqlite, and aiomysql on MySQL/MariaDB (`pip install 'dbcancel[asyncio]'`).

    Running jobs are always watched: per event loop and database, one task polls every
    running job of each table in one statement per interval and beats this process's
    worker row, and on PostgreSQL one listener connection receives the cancels and ends
    of every table (no thread). `watch` and `clock` are taken as every entry point takes
    them, and only the watched mode on real time is accepted: a checkpoint that polls by
    itself would run its round trip on the event loop (`watch=False` or a custom `clock`
    raise [`UsageError`][dbcancel.UsageError]). A `Jobs` and an `AsyncJobs` on the same
    table in one process share its jobs: a cancel through either stops a job run by the
    other at once.
    """

    def __init__(
        self,
        bind: Any,
        model: Any,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        listen_url: Any = None,
    ) -> None:
        engine = _async_engine(bind)
        dsn = None
        if listen_url is not None:
            from ._pg import listen_dsn

            dsn = listen_dsn(listen_url)  # raises on a bad value: nothing is opened
        options = Options.checked(
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
        )
        if not options.watched:
            raise UsageError(
                "AsyncJobs runs every job in the watched mode, on real time: a checkpoint "
                "that polls by itself (watch=False, or a custom clock) would wait on the "
                "database on the event loop. Leave watch and clock out, or use Jobs("
                "engine.sync_engine, ..., watch=False) for a threadless worker; nothing "
                "was changed"
            )
        seconds, staleness = options.interval, options.max_staleness
        backend = SQLAlchemyBackend(engine.sync_engine, model)
        if dsn is not None:
            backend.listen_directly(dsn)  # raises for a database other than PostgreSQL
        self._engine = engine
        self._listen_url = listen_url
        self._core = _Core(
            backend,
            interval=seconds,
            max_staleness=staleness,
            heartbeat=check_seconds("heartbeat", heartbeat),
        )
        self._backend = backend
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    # -- properties -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The name of the job model, as used in error messages."""
        return self._backend.model_name

    @property
    def interval(self) -> float:
        """Seconds between two polls of a running job's row."""
        return self._core._interval

    @property
    def heartbeat(self) -> float:
        """Seconds between two beats of this process's worker row while jobs run."""
        return self._core._heartbeat_period

    @property
    def watch(self) -> bool:
        """The mode in effect: always True (the runtime's tasks poll the running jobs)."""
        return True

    @property
    def clock(self) -> Callable[[], float] | None:
        """The clock the checkpoints read: always None, for `time.monotonic`."""
        return None

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a successful poll after which running jobs are cancelled
        locally; None when they keep running through an outage."""
        return self._core._max_staleness

    @property
    def listen_url(self) -> Any:
        """The URL of the listener's own connection to PostgreSQL, as given; None when
        the listener connects through the engine like everything else."""
        return self._listen_url

    def __repr__(self) -> str:
        return f"<AsyncJobs {self.model_name} interval={self.interval}>"

    async def _ready(self) -> None:
        """Resolve which table this is (one round trip, the first time only)."""
        if self._backend._identity is not None:
            return
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            if self._backend._identity is None:
                await greenlet_spawn(self._backend._identify)

    # -- requesting -------------------------------------------------------------------

    async def cancel(
        self, job_id: JobId, *, reason: str | None = None, where: Mapping[str, Any] | None = None
    ) -> bool:
        """Cancel a pending or running job; durable when this returns.

        As [`Jobs.cancel`][dbcancel.Jobs.cancel]: True when the job is cancelled (by this
        call or before), False when it had already completed or failed (nothing
        changed), [`JobNotFound`][dbcancel.JobNotFound] when no row has this id and
        matches `where`. Checkpoints of the job running in this process (under
        `AsyncJobs` or `Jobs`) see the cancel before this returns.
        """
        self._backend.check_id(job_id)
        self._backend.check_filters(where)
        await self._ready()
        return await greenlet_spawn(
            JobsClient.cancel, self._core, job_id, reason=reason, where=where
        )

    async def cancel_where(self, **filters: Any) -> int:
        """Cancel every pending or running job matching `filters` (at least one); return
        how many. As [`Jobs.cancel_where`][dbcancel.Jobs.cancel_where]."""
        if filters:
            self._backend.check_filters(filters)
            await self._ready()
        return await greenlet_spawn(JobsClient.cancel_where, self._core, **filters)

    async def status(self, job_id: JobId) -> Status:
        """The job's current status, read from the database."""
        self._backend.check_id(job_id)
        await self._ready()
        return await greenlet_spawn(JobsClient.status, self._core, job_id)

    async def wait(self, job_id: JobId, timeout: float | None = None) -> Status:
        """Wait until the job has stopped (`finished_at` set); return its final status.

        As [`Jobs.wait`][dbcancel.Jobs.wait]: `TimeoutError` after `timeout` seconds,
        [`JobNotFound`][dbcancel.JobNotFound] for a missing row, and a job running in
        this process is waited for until its worker has left `run()`. Every pause is an
        `await`, and no thread is held: the loop's runtime reads the rows of every
        waited job of the table in one statement, `min(interval, 1 s)` apart, and on
        PostgreSQL its listener wakes the wait when the job's end is announced.
        """
        b = self._backend
        b.check_id(job_id)
        check_timeout(timeout)
        await self._ready()
        core = self._core

        async def read() -> Any:
            return await greenlet_spawn(core._read, job_id)

        async def read_many(job_ids: Any) -> Any:
            return await greenlet_spawn(b.read_many, job_ids)

        every = min(core._interval, MAX_WAIT_POLL)
        async with loop_runtime().waiting(b, job_id, reader=read_many, every=every) as woken:
            return await wait_stopped(
                read,
                key=b.key,
                job_id=job_id,
                model_name=b.model_name,
                timeout=timeout,
                interval=core._interval,
                woken=woken,
            )

    async def reap(self, stale_after: float) -> int:
        """Stop the jobs whose worker is gone; return how many. As
        [`Jobs.reap`][dbcancel.Jobs.reap]."""
        check_seconds("stale_after", stale_after)
        await self._ready()
        return await greenlet_spawn(JobsClient.reap, self._core, stale_after)

    # -- running ----------------------------------------------------------------------

    def run(
        self, job_id: JobId, *, where: Mapping[str, Any] | None = None, cancel_task: bool = False
    ) -> AsyncJobRun:
        """Run a job: `async with jobs.run(job_id) as cp:` yields its Checkpoint.

        Enter and exit as for [`Jobs.run`][dbcancel.Jobs.run]: pending → in_progress on
        enter (a job cancelled before it started raises `Cancelled` from the `async with`
        statement itself and the block never runs; a missing row raises
        [`JobNotFound`][dbcancel.JobNotFound], any other state
        [`InvalidTransition`][dbcancel.InvalidTransition]); on exit completed, or still
        cancelled; a `Cancelled` of the job is swallowed, any other exception fails the
        job and propagates. The end is written even when the task is cancelled
        meanwhile (a timeout, a server shutting down).

        `cancel_task=True`: a cancel of the job also cancels the task running the block,
        so that a body blocked in an `await` (a socket read, a `sleep`, a WebSocket
        receive) stops without calling `cp()`. The job then ends cancelled with its
        reason and the block swallows that `CancelledError`; an outer cancellation
        (a timeout, a server shutting down) is not taken for it: it propagates, and
        the job ends as any interrupted one, failed with `CancelledError`.
        """
        self._backend.check_id(job_id)
        self._backend.check_filters(where)
        if not isinstance(cancel_task, bool):
            raise TypeError(f"cancel_task must be True or False, got {cancel_task!r}")
        return AsyncJobRun(self, job_id, where, cancel_task)

    def active(self) -> tuple[ActiveJob, ...]:
        """The jobs of this table running in this process now (under `AsyncJobs` or
        `Jobs`)."""
        if self._backend._identity is None:
            return ()  # no job ran or was cancelled through it yet
        return registry.active(self._backend.key)

    def stats(self) -> JobsStats:
        """Counters and state of this process's polling of this table; see
        [`JobsStats`][dbcancel.JobsStats]. `watching`, `listening` and the heartbeat
        counters are those of the running loop's tasks."""
        if self._backend._identity is None:
            return JobsStats(0, False, False, 0, 0, 0, 0, None, None)
        h = self._core._health
        try:
            rt = current_loop_runtime(asyncio.get_running_loop())
        except RuntimeError:
            rt = None
        watching, listening, beats, errors = (
            (False, False, 0, 0) if rt is None else rt.table_stats(self._backend)
        )
        connections = 0 if rt is None else rt.connections(self._backend)
        polls, poll_errors, notifications, listener_errors, last_outage = h.snapshot()
        return JobsStats(
            active_jobs=len(self.active()),
            watching=watching,
            listening=listening,
            polls=polls,
            poll_errors=poll_errors,
            notifications=notifications,
            listener_errors=listener_errors,
            outage=h.outage(),
            last_outage=last_outage,
            heartbeats=beats,
            heartbeat_errors=errors,
            connections=connections,
        )


class AsyncJobRun:
    """The context manager returned by [`AsyncJobs.run`][dbcancel.AsyncJobs.run]; yields
    the job's Checkpoint. Usable once, with `async with`."""

    __slots__ = (
        "_base",
        "_cancel_task",
        "_closing",
        "_cp",
        "_entry",
        "_handle",
        "_job_id",
        "_jobs",
        "_requested",
        "_started",
        "_task",
        "_where",
    )

    def __init__(
        self, jobs: AsyncJobs, job_id: Any, where: Mapping[str, Any] | None, cancel_task: bool
    ) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._where = dict(where) if where else None
        self._cancel_task = cancel_task
        self._cp: Checkpoint | None = None
        self._entry: ActiveJob | None = None
        self._started = False
        self._task: asyncio.Task[Any] | None = None
        self._base = 0
        self._handle: CallbackHandle | None = None
        self._requested = False
        self._closing = False

    async def __aenter__(self) -> Checkpoint:
        if self._cp is not None:
            raise RuntimeError("a run can be entered only once; call jobs.run() again")
        jobs = self._jobs
        core, b = jobs._core, jobs._backend
        await jobs._ready()
        rt = loop_runtime()
        period = core._heartbeat_period
        worker = await rt.join(b, period)
        started, reason = True, None
        try:
            try:
                applied = await greenlet_spawn(
                    b.apply, start_change(worker), job_id=self._job_id, filters=self._where
                )
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Interrupted while the start was under way: it may have committed.
                    await _shielded(
                        greenlet_spawn(core._settle_interrupted_start, self._job_id, worker, exc)
                    )
                started = False
                raise
            if not applied:
                started = False
                row = await greenlet_spawn(core._read, self._job_id, self._where)
                if row.status is not Status.CANCELLED:
                    raise InvalidTransition(
                        b.model_name,
                        self._job_id,
                        row.status.value,
                        Status.IN_PROGRESS.value,
                        row.worker_id if row.status is Status.IN_PROGRESS else None,
                    )
                # Cancelled before any worker started it: as with Jobs, the body must not
                # run, and this run writes nothing.
                cancelled = Cancelled(self._job_id, row.cancel_reason)
                cancelled._dbcancel_key = b.key  # type: ignore[attr-defined]
                raise cancelled
        finally:
            if not started:
                rt.leave(b, period)
        cp = Checkpoint(
            core,
            self._job_id,
            interval=core._interval,
            clock=time.monotonic,
            key=b.key,
            cancelled=not started,
            reason=reason,
            watched=True,
            max_staleness=core._max_staleness,
            health=core._health,
        )
        self._cp = cp
        self._started = started
        self._entry = ActiveJob(cp.job_id, cp, threading.current_thread(), utcnow())
        registry.add(b.key, self._entry)
        if started and _events.on:
            _events.job_started(b, cp)
        if started:
            rt.watch(b, core._health, cp)
        _push(cp)
        if self._cancel_task:
            task = asyncio.current_task()
            assert task is not None
            self._task = task
            self._base = task.cancelling()
            loop = asyncio.get_running_loop()
            self._handle = cp.on_cancel(lambda: _call_soon(loop, self._cancel))
        return cp

    def _cancel(self) -> None:
        """On the loop: the job was cancelled; cancel the task running its block."""
        task = self._task
        if self._closing or task is None or task.done():
            return
        self._requested = True
        cp = self._cp
        reason = None if cp is None else cp.reason
        task.cancel(f"dbcancel: {self._jobs.model_name} {self._job_id!r} cancelled ({reason})")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        cp = self._cp
        assert cp is not None
        self._closing = True
        if self._handle is not None:
            self._handle.remove()
        outer = False
        ours = False
        if self._requested:
            task = self._task
            assert task is not None
            if not isinstance(exc, asyncio.CancelledError):
                # Requested, perhaps not delivered yet: take the delivery here, so that
                # it cannot hit the writes below.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            outer = task.uncancel() > self._base
            if isinstance(exc, asyncio.CancelledError) and not outer:
                ours = True
                exc = cp._exception()  # the job's own Cancelled: it ends cancelled
        _pop(cp)
        jobs = self._jobs
        core, b = jobs._core, jobs._backend
        if self._started:
            loop_runtime().unwatch(b, cp)
        entry = self._entry
        started = self._started

        async def finish() -> bool:
            try:
                return await greenlet_spawn(core._finish, cp, exc, started)
            finally:
                if entry is not None:
                    registry.remove(b.key, entry)
                cp._ended()

        # A task of its own, shielded: a task cancelled while the end is written
        # still has its end written, and wait() returns only after it.
        swallowed = await asyncio.shield(asyncio.get_running_loop().create_task(finish()))
        if outer:
            # Someone else's cancellation as well: it goes on (the one under way, or
            # the one whose delivery this block took in above).
            if isinstance(exc, asyncio.CancelledError):
                return False
            raise asyncio.CancelledError()
        return swallowed or ours


async def _shielded(aw: Any) -> None:
    """Run `aw` to its end, even if this task is cancelled meanwhile."""
    task = asyncio.ensure_future(aw)
    # What it settles logs its own failures; a cancel of this task leaves it running.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.shield(task)
