"""The runtime of [`AsyncJobs`][dbcancel.AsyncJobs]: tasks on the event loop, not a thread.

The same rules as the runtime thread's (`dbcancel._runtime`), as one task per loop and
database: it polls the running jobs of each table with ONE statement per interval
(jittered, backing off while polls fail, never past a job's `max_staleness`, through
the same `poll_step`), beats this process's worker row while jobs of the database run
here (the first job of an idle process beats before it starts; each beat records its
period), and on PostgreSQL keeps ONE listener connection per database (asyncpg's
`add_listener`, or psycopg's async `notifies()`) on which every table's channel is
LISTENed: a cancel that names a job flips its checkpoint, `*` makes its table poll now,
and an end wakes the `wait()` calls of this loop. A database with nothing to serve
closes its listener after `IDLE_GRACE` seconds, and its task ends; the next job or
waiter starts a new one.

The round trips run on the loop through SQLAlchemy's greenlet bridge: the synchronous
backend's own statements, on the `AsyncEngine`'s driver, never blocking the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable, Mapping
from typing import Any

from . import _events, _runtime, _timeouts
from ._aio import LoopEvent
from ._events import table_of
from ._health import Health, health_for
from ._liveness import DEFAULT_HEARTBEAT, worker_id
from ._random import rng
from ._runtime import IDLE_GRACE, JITTER, _beat_worker, poll_delay
from .backend import JobRow, read_payload, row_text
from .checkpoint import MAX_BACKOFF, Checkpoint, Rows, backoff, poll_step

__all__ = ["LoopRuntime", "current_loop_runtime", "loop_runtime"]

WAIT_FIRST = 0.05
"""Seconds from a new waiter to the first poll of the waited rows (at most)."""

log = logging.getLogger("dbcancel")


async def greenlet_spawn(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` through SQLAlchemy's greenlet bridge (imported here, on
    first use: the waits of a synchronous `Jobs` use this runtime without SQLAlchemy's
    asyncio extension)."""
    from sqlalchemy.util import greenlet_spawn as spawn

    return await spawn(fn, *args, **kwargs)


class _Table:
    """One job table of one database, on this loop: its watched checkpoints and waiters."""

    def __init__(self, backend: Any, health: Health, db: _Database) -> None:
        self.backend = backend
        self.health = health
        self.db = db
        self.watched: dict[Checkpoint, int] = {}
        self.waiters: dict[str, set[LoopEvent]] = {}
        # The rows that wait() calls of this loop wait for (by id, with their count),
        # read together, one statement per table, every `wait_every` seconds.
        self.waited: dict[Any, int] = {}
        self.reader: Callable[[Collection[Any]], Awaitable[Mapping[Any, JobRow]]] | None = None
        self.wait_every = math.inf
        self.wait_due = math.inf
        self.wait_failures = 0
        self.listen = True  # False: another runtime (the thread's) listens for it
        self.due = math.inf
        self.failures = 0
        self.channel: str | None = None  # once resolved (PostgreSQL)

    def interval(self) -> float:
        return min((cp.interval for cp in self.watched), default=math.inf)

    def needs_listener(self) -> bool:
        return bool(self.watched or (self.listen and self.waiters))

    def busy(self) -> bool:
        return bool(self.watched or self.waiters)


class _Database:
    """One database's share of the loop runtime: tables, heartbeat, listener, task."""

    def __init__(self, backend: Any, counts: list[int]) -> None:
        self.backend = backend
        self.key: Hashable = None  # (worker key, bridged): this database's in the runtime
        self.label: str = backend.label
        self.tables: dict[Hashable, _Table] = {}
        self.periods: Counter[float] = Counter()
        self.beating = asyncio.Lock()
        # The lease: polls and beats of this database take turns, so that they hold
        # one connection of it at a time; `out` is True while one is out.
        self.lease = asyncio.Lock()
        self.out = False
        self.beaten = -math.inf
        self.tried = -math.inf
        self.factor = rng.uniform(1.0, 1.0 + JITTER)
        self.recorded = math.inf
        self.counts = counts
        self.beat_failing = False
        self.idle_since: float | None = None
        self.kick = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.listener: _Listener | None = None
        self.listen_failures = 0
        self.listen_failing = False
        self.reconnect_at = 0.0
        self.probe_until = math.inf  # while the listener's probe is awaited
        self.deaf = False  # its probe never arrived (warned once)
        dialect = getattr(getattr(backend, "engine", None), "dialect", None)
        self.postgresql = getattr(dialect, "name", None) == "postgresql"

    def busy(self) -> bool:
        return bool(self.periods) or any(t.busy() for t in self.tables.values())

    @contextlib.asynccontextmanager
    async def borrow(self) -> Any:
        """Hold the lease for one round trip (see `lease`)."""
        async with self.lease:
            self.out = True
            try:
                yield
            finally:
                self.out = False

    def connections(self) -> int:
        """Connections held open now for this database: listener and lease."""
        listening = 1 if self.listener is not None and self.listener.connected else 0
        return listening + (1 if self.out else 0)

    def beat_due(self) -> float:
        if not self.periods:
            return math.inf
        return self.tried + min(min(self.periods), self.recorded) * self.factor

    async def beat(self, *, fresh_within: float | None = None) -> bool:
        """Beat the worker row now (one beat at a time); True if it did. Raises."""
        async with self.beating:
            started = time.monotonic()
            if fresh_within is not None and started - self.beaten < fresh_within:
                return False
            self.tried = started
            period = min(self.periods, default=fresh_within or DEFAULT_HEARTBEAT)
            async with self.borrow(), asyncio.timeout(_timeouts.POLL_TIMEOUT):
                await greenlet_spawn(_beat_worker, self.backend, period)
            self.recorded = period
            self.beaten = started
            self.counts[0] += 1
            if _events.on:
                _events.emit("beat", self.label)
            return True

    async def beat_logged(self) -> None:
        try:
            await self.beat()
        except Exception:
            self.counts[1] += 1
            if not self.beat_failing:
                self.beat_failing = True
                log.warning(
                    "dbcancel: the heartbeat of %s failed; its jobs look dead to reap() "
                    "once it has failed for several heartbeat periods",
                    self.label,
                    exc_info=True,
                )
            return
        if self.beat_failing:
            self.beat_failing = False
            log.warning("dbcancel: the heartbeat of %s works again", self.label)


class _Listener:
    """One PostgreSQL connection of the loop's driver (asyncpg or psycopg's async mode),
    taken out of the engine's pool for good, LISTENing on the channels of a database."""

    def __init__(self, conn: Any, kind: str, deliver: Any) -> None:
        self.conn = conn
        self.kind = kind
        self.deliver = deliver  # (channel, payload) -> None, on the loop
        self.channels: set[str] = set()
        self.broken = False
        # Its own probe channel, and whether the probe sent through the engine arrived.
        self.probe: str | None = None
        self.heard = False
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, engine: Any, deliver: Any, dsn: str | None = None) -> _Listener:
        """Open a connection of `engine` (the sync face of the `AsyncEngine`), or of
        psycopg's async mode to `dsn` (`listen_url`); named as the listener at connect
        time either way."""
        from ._pg import connect_from_engine, listener_name

        async with asyncio.timeout(_timeouts.POLL_TIMEOUT):
            if dsn is None:
                conn = await greenlet_spawn(connect_from_engine(engine))
            else:
                import psycopg
                from psycopg.conninfo import conninfo_to_dict

                kwargs: dict[str, Any] = conninfo_to_dict(dsn)
                kwargs["application_name"] = listener_name(kwargs.get("application_name"))
                conn = await psycopg.AsyncConnection.connect(**kwargs)
        kind = "asyncpg" if type(conn).__module__.startswith("asyncpg") else "psycopg"
        self = cls(conn, kind, deliver)
        try:
            if kind == "psycopg":
                await conn.set_autocommit(True)
            else:
                conn.add_termination_listener(self._terminated)
            # A probe channel of its own (see LoopRuntime._probe), listened to before
            # psycopg's reader takes the connection.
            import uuid

            probe = f"dbcancel:probe:{uuid.uuid4().hex}"
            await self.listen(probe)
            self.probe = probe
            # Named as the listener at connect time (connect_from_engine), never with a
            # SET on the session.
            if kind == "psycopg":
                self.reader = asyncio.get_running_loop().create_task(self._read())
        except BaseException:
            await self.close()
            raise
        return self

    async def _execute(self, sql: str) -> None:
        async with asyncio.timeout(_timeouts.POLL_TIMEOUT):
            await self.conn.execute(sql)  # asyncpg's and psycopg's take SQL alike

    async def listen(self, channel: str) -> None:
        if channel in self.channels:
            return
        if self.kind == "asyncpg":
            async with asyncio.timeout(_timeouts.POLL_TIMEOUT):
                await self.conn.add_listener(channel, self._received)
        else:
            await self._execute('LISTEN "' + channel.replace('"', '""') + '"')
        self.channels.add(channel)

    def _received(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.deliver(channel, payload)

    def _terminated(self, conn: Any) -> None:
        self.broken = True
        self.deliver(None, None)

    async def _read(self) -> None:
        try:
            async for note in self.conn.notifies():
                self.deliver(note.channel, note.payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        self.broken = True
        self.deliver(None, None)

    @property
    def connected(self) -> bool:
        if self.broken:
            return False
        closed = getattr(self.conn, "is_closed", None)
        if callable(closed):
            return not closed()
        return not bool(getattr(self.conn, "closed", False))

    async def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.conn.close()
        if self.kind == "asyncpg" and not self.conn.is_closed():
            self.conn.terminate()


class LoopRuntime:
    """The tasks that serve the jobs and waiters of one event loop; see the module."""

    def __init__(self) -> None:
        # No reference to the loop itself: the runtimes are kept by loop in a
        # WeakKeyDictionary, and a value that referenced its key would keep every loop
        # ever used (each asyncio.run()) alive. Everything here runs on the loop.
        self._databases: dict[Hashable, _Database] = {}
        self._counts: dict[Hashable, list[int]] = {}

    # -- what jobs, checkpoints and waiters call (on the loop) ------------------------

    def watch(self, backend: Any, health: Health, cp: Checkpoint) -> None:
        """Poll `cp` from the next poll of its table on (within its interval)."""
        db = self._database(backend)
        table = self._table(db, backend, health)
        table.watched[cp] = table.watched.get(cp, 0) + 1
        table.due = min(table.due, time.monotonic() + cp.interval)
        self._serve(db)

    def unwatch(self, backend: Any, cp: Checkpoint) -> None:
        db = self._databases.get((backend.worker_key, True))
        table = None if db is None else db.tables.get(backend.key)
        if db is None or table is None:
            return
        count = table.watched.pop(cp, 0) - 1
        if count > 0:
            table.watched[cp] = count
        elif not table.watched:
            table.due = math.inf
        db.kick.set()

    async def join(self, backend: Any, period: float) -> str:
        """Count a job about to start; beat first when the worker row is not fresh."""
        db = self._database(backend)
        db.backend = backend
        db.periods[period] += 1
        within = min(period, db.recorded)
        fresh = time.monotonic() - db.beaten < within
        self._serve(db)
        if not fresh:
            try:
                await db.beat(fresh_within=within)
            except BaseException:
                self.leave(backend, period)
                raise
        return worker_id()

    def leave(self, backend: Any, period: float) -> None:
        db = self._databases.get((backend.worker_key, True))
        if db is None:
            return
        db.periods[period] -= 1
        if db.periods[period] <= 0:
            del db.periods[period]
        db.kick.set()

    @contextlib.asynccontextmanager
    async def waiting(
        self,
        backend: Any,
        job_id: Any,
        *,
        reader: Callable[[Collection[Any]], Awaitable[Mapping[Any, JobRow]]],
        every: float,
        event: LoopEvent | None = None,
        listen: bool = True,
        bridged: bool = True,
    ) -> AsyncIterator[LoopEvent]:
        """An event set when `job_id` may have stopped, for the block: when its row,
        read with those of every other waiter of its table (`reader`, one statement
        at most `every` seconds apart), has `finished_at` or is gone, and on PostgreSQL
        when a notification names the job (`listen=False`: the caller's runtime
        thread listens, and sets `event`). `bridged`: the backend runs on the loop
        through the greenlet bridge (an `AsyncJobs`'); False for a synchronous one,
        whose waiters this runtime serves apart (their reads run in threads)."""
        db = self._database(backend, bridged=bridged)
        table = self._table(db, backend, None)
        table.listen = listen and db.postgresql
        table.reader = reader
        event = LoopEvent(asyncio.get_running_loop()) if event is None else event
        table.waiters.setdefault(str(job_id), set()).add(event)
        table.waited[job_id] = table.waited.get(job_id, 0) + 1
        table.wait_every = min(table.wait_every, every)
        table.wait_due = min(table.wait_due, time.monotonic() + min(every, WAIT_FIRST))
        self._serve(db)
        try:
            yield event
        finally:
            events = table.waiters.get(str(job_id))
            if events is not None:
                events.discard(event)
                if not events:
                    del table.waiters[str(job_id)]
            count = table.waited.pop(job_id, 0) - 1
            if count > 0:
                table.waited[job_id] = count
            elif not table.waited:
                table.wait_every = table.wait_due = math.inf

    def table_stats(self, backend: Any) -> tuple[bool, bool, int, int]:
        """Served (its task running), listened to, beats and beat errors."""
        beats, errors = self._counts.get(backend.worker_key, (0, 0))
        db = self._databases.get((backend.worker_key, True))
        if db is None:
            return False, False, beats, errors
        table = db.tables.get(backend.key)
        running = db.task is not None and not db.task.done()
        watching = running and table is not None and bool(table.watched)
        listening = (
            db.listener is not None
            and db.listener.connected
            and db.listener.heard
            and table is not None
            and table.channel in db.listener.channels
        )
        return watching, listening, beats, errors

    def connections(self, backend: Any) -> int:
        """Connections this loop's runtime holds open now for `backend`'s database."""
        db = self._databases.get((backend.worker_key, True))
        return 0 if db is None else db.connections()

    # -- internals --------------------------------------------------------------------

    def _database(self, backend: Any, *, bridged: bool = True) -> _Database:
        key = (backend.worker_key, bridged)
        db = self._databases.get(key)
        if db is None:
            counts = self._counts.setdefault(backend.worker_key, [0, 0])
            db = self._databases[key] = _Database(backend, counts)
            db.key = key
        db.idle_since = None
        return db

    def _table(self, db: _Database, backend: Any, health: Health | None) -> _Table:
        table = db.tables.get(backend.key)
        if table is None:
            table = db.tables[backend.key] = _Table(
                backend,
                health
                if health is not None
                else health_for(backend.key, backend.label, table_of(backend)),
                db,
            )
        else:
            table.backend = backend
        return table

    def _serve(self, db: _Database) -> None:
        """Make sure `db`'s task runs (started again if it ended), and wake it."""
        if db.task is None or db.task.done():
            db.task = asyncio.get_running_loop().create_task(
                self._run(db), name=f"dbcancel-{db.label}"
            )
        db.kick.set()

    async def _run(self, db: _Database) -> None:
        try:
            while True:
                try:
                    if not await self._step(db):
                        return
                except asyncio.CancelledError:
                    raise
                except Exception:  # never die: a dead task stops every cancel
                    log.exception("dbcancel: the loop task of %s failed; going on", db.label)
                    await asyncio.sleep(0.05)
        finally:
            # Ended: idle, or cancelled (its loop shutting down). An idle database is
            # forgotten; a busy one stays, and the next job or waiter starts a task again.
            db.task = None
            if self._databases.get(db.key) is db and not db.busy():
                del self._databases[db.key]
            listener, db.listener = db.listener, None
            if listener is not None:
                with contextlib.suppress(BaseException):
                    await listener.close()

    async def _step(self, db: _Database) -> bool:
        """One round: what is due, then a wait for the next due time or a kick. False
        once the database has been idle for the grace period (it is then forgotten)."""
        db.kick.clear()
        now = time.monotonic()
        if not db.busy():
            if db.idle_since is None:
                db.idle_since = now
            if now - db.idle_since >= IDLE_GRACE:
                if self._databases.get(db.key) is db:
                    del self._databases[db.key]
                return False
            await self._wait(db, db.idle_since + IDLE_GRACE)
            return True
        db.idle_since = None
        next_at = math.inf
        if db.postgresql and any(t.needs_listener() for t in db.tables.values()):
            if db.listener is not None and not db.listener.connected:
                await self._listen_failed(db, None)
            if db.reconnect_at <= now:
                await self._listen(db)
            if db.listener is None:
                next_at = min(next_at, db.reconnect_at)
            next_at = min(next_at, self._check_probe(db, time.monotonic()))
        for table in list(db.tables.values()):
            if table.watched:
                if table.due <= time.monotonic():
                    await self._poll(table)
                next_at = min(next_at, table.due)
            if table.waited:
                if table.wait_due <= time.monotonic():
                    await self._poll_waited(table)
                next_at = min(next_at, table.wait_due)
        if db.beat_due() <= time.monotonic():
            await db.beat_logged()
        next_at = min(next_at, db.beat_due())
        await self._wait(db, next_at)
        return True

    async def _wait(self, db: _Database, until: float) -> None:
        timeout = until - time.monotonic()
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                await db.kick.wait()

    async def _listen(self, db: _Database) -> None:
        """Open the listener if needed and LISTEN on every table's channel that needs
        it; the tables of a channel just listened to poll at once (a cancel committed
        before LISTEN took effect was announced to nobody), and their waiters read
        their rows again."""
        try:
            fresh = db.listener is None
            if db.listener is None:
                db.listener = await _Listener.open(
                    db.backend.engine,
                    lambda ch, p: self._deliver(db, ch, p),
                    getattr(db.backend, "_listen_dsn", None),
                )
            for table in list(db.tables.values()):
                if not table.needs_listener():
                    continue
                if table.channel is None:
                    table.channel = table.backend.channel
                if table.channel in db.listener.channels:
                    continue
                await db.listener.listen(table.channel)
                if table.watched:
                    table.due = 0.0
                for events in table.waiters.values():
                    for event in events:
                        event.set()
            if fresh:
                # After the tables' LISTENs: psycopg's reader holds the connection from
                # its first await on.
                await self._probe(db, db.listener)
        except Exception:
            await self._listen_failed(db, sys_exc=True)
            return
        db.listen_failures = 0
        if db.listen_failing:
            db.listen_failing = False
            log.warning("dbcancel: listening for cancels of %s again", db.label)

    async def _probe(self, db: _Database, listener: _Listener) -> None:
        """Send the new listener its probe through the engine (the way a cancel goes):
        it counts as listening once the probe arrives (see
        `dbcancel._runtime.PROBE_TIMEOUT`). Raises."""
        notify = getattr(db.backend, "notify", None)
        probe = listener.probe
        if not callable(notify) or probe is None:
            listener.heard = True  # a backend that cannot send it: trusted as before
            return
        db.probe_until = time.monotonic() + _runtime.PROBE_TIMEOUT
        async with db.borrow(), asyncio.timeout(_timeouts.POLL_TIMEOUT):
            await greenlet_spawn(notify, probe, "probe")

    def _check_probe(self, db: _Database, now: float) -> float:
        """Warn once when the probe is late; when to look again."""
        listener = db.listener
        if listener is None or listener.heard or math.isinf(db.probe_until):
            if listener is not None and listener.heard:
                db.probe_until = math.inf
                db.deaf = False
            return math.inf
        if now < db.probe_until:
            return db.probe_until
        db.probe_until = math.inf
        if not db.deaf:
            db.deaf = True
            log.warning(_runtime.DEAF_WARNING, db.label, _runtime.PROBE_TIMEOUT)
        return math.inf

    async def _listen_failed(self, db: _Database, sys_exc: bool | None = None) -> None:
        listener, db.listener = db.listener, None
        if listener is not None:
            await listener.close()
        for table in db.tables.values():
            table.health.count(listener_errors=1)
        db.listen_failures += 1
        delay = min(0.1 * 2.0 ** (db.listen_failures - 1), MAX_BACKOFF)
        db.reconnect_at = time.monotonic() + delay
        if not db.listen_failing:
            db.listen_failing = True
            log.warning(
                "dbcancel: listening for cancels of %s failed; polling alone until it reconnects",
                db.label,
                exc_info=bool(sys_exc),
            )

    def _deliver(self, db: _Database, channel: str | None, payload: str | None) -> None:
        """A notification (or, with None, the listener's end), on the loop."""
        if channel is None or payload is None:
            db.kick.set()
            return
        listener = db.listener
        if listener is not None and channel == listener.probe:
            listener.heard = True
            return
        for table in db.tables.values():
            if table.channel != channel:
                continue
            table.health.count(notifications=1)
            kind, job_id, reason = read_payload(payload)
            if kind == "cancel" and job_id is not None:
                for cp in list(table.watched):
                    if str(cp.job_id) == job_id:
                        cp._observe(reason)
            elif kind in ("poll", "cancel") and table.watched:
                table.due = 0.0
                db.kick.set()
            if job_id is None:
                events = [e for es in table.waiters.values() for e in es]
            else:
                events = list(table.waiters.get(job_id, ()))
            for event in events:
                event.event.set()

    async def _poll_waited(self, table: _Table) -> None:
        """Read the rows waited for in one statement; wake the waiters of those that
        stopped (or are gone), who then read their own row once."""
        ids = list(table.waited)
        reader = table.reader
        assert reader is not None
        try:
            async with table.db.borrow(), asyncio.timeout(_timeouts.POLL_TIMEOUT):
                rows = await reader(ids)
        except Exception:
            table.wait_failures += 1
            table.wait_due = time.monotonic() + backoff(table.wait_every, table.wait_failures)
            log.debug("dbcancel: reading the waited rows of %s failed", table.backend.label)
            return
        table.wait_failures = 0
        for job_id in ids:
            row = rows.get(job_id)
            if row is None or row.finished_at is not None:
                for event in table.waiters.get(str(job_id), ()):
                    event.event.set()
        every = table.wait_every
        table.wait_due = (
            time.monotonic() + every * rng.uniform(1 - JITTER, 1 + JITTER)
            if table.waited
            else math.inf
        )

    async def _poll(self, table: _Table) -> None:
        """Poll every watched job of `table` in one statement; schedule the next."""
        cps = list(table.watched)
        interval = table.interval()
        stale_in = min((cp._stale_in() for cp in cps), default=math.inf)
        bound = min(_timeouts.POLL_TIMEOUT, max(stale_in, 0.1))
        rows: Rows = {}
        error: Exception | None = None
        try:
            async with table.db.borrow(), asyncio.timeout(bound):
                rows = await greenlet_spawn(_read_rows, table.backend, {cp.job_id for cp in cps})
        except Exception as err:
            error = err

        def read(job_ids: Collection[Any]) -> Rows:
            if error is not None:
                raise error
            return rows

        try:
            poll_step(read, table.health, cps, still_polled=lambda cp: cp in table.watched)
        except Exception:
            table.failures += 1
        else:
            table.failures = 0
        stale_in = min((cp._stale_in() for cp in cps), default=math.inf)
        delay = poll_delay(interval, table.failures, stale_in)
        table.due = time.monotonic() + delay if table.watched else math.inf


def _read_rows(backend: Any, job_ids: Collection[Any]) -> Rows:
    rows = backend.read_many(job_ids)
    return {job_id: (row.status, row_text(row)) for job_id, row in rows.items()}


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRuntime] = (
    weakref.WeakKeyDictionary()
)


def loop_runtime() -> LoopRuntime:
    """The running loop's runtime, made on first use."""
    loop = asyncio.get_running_loop()
    rt = _runtimes.get(loop)
    if rt is None:
        rt = _runtimes[loop] = LoopRuntime()
    return rt


def current_loop_runtime(loop: asyncio.AbstractEventLoop) -> LoopRuntime | None:
    """`loop`'s runtime if it has one."""
    return _runtimes.get(loop)
