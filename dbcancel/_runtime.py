"""The runtime: one supervised background thread per process, for every database and table.

The thread polls the watched jobs of each table with ONE statement per interval (through
the same poll step as a threadless checkpoint, `dbcancel.checkpoint.poll_step`), beats
this process's worker row in each database while jobs of it run here, and on
PostgreSQL waits between polls on ONE listener connection per database (one channel per
table) for the notifications of cancels and of jobs' ends. A cancel flips the
checkpoints of its jobs and runs their `on_cancel` callbacks in this thread; a job's end
wakes the `wait()` calls of this process waiting for it.

Supervision: user callbacks run isolated (any exception, `BaseException` included, is
logged with the job and stays here); the thread catches whatever escapes a step, logs
it and goes on; and should it die anyway, the next job, waiter or checkpoint that needs
it starts a new one (`stats().restarts` counts them).

Bounded connections: per database, the runtime uses at most ONE connection at a time for
its polls, heartbeats and listener probes (they take turns through the database's
lease; a heartbeat from a job's own thread waits for the poll under way), plus at most
ONE listener connection for all the database's tables.

Bounded resources: a database with nothing to serve gives back its connections at once
and its listener after `IDLE_GRACE` seconds, and is then forgotten (so are its
engines); the thread itself sleeps while nothing is served. `shutdown()` stops it. In
a forked child none of this exists: the child's first job starts the child's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from . import _events, _timeouts
from ._events import table_of
from ._health import Health
from ._liveness import DEFAULT_HEARTBEAT, worker_id
from ._random import rng
from .backend import Backend, Listener, read_payload, row_text
from .checkpoint import MAX_BACKOFF, Checkpoint, Rows, backoff, poll_step

__all__ = ["IDLE_GRACE", "Runtime", "RuntimeStats", "current_runtime", "runtime"]

log = logging.getLogger("dbcancel")

IDLE_GRACE = 5.0
"""Seconds a database without running jobs or waiters keeps its listener connection."""

JITTER = 0.1
"""Each wait between polls is the interval times a random factor in [1 - J, 1 + J], so
that processes started together do not poll in lockstep (beats: [1, 1 + J])."""

LISTEN_SLICE = 0.5
"""Longest wait on a listener that offers no file descriptor to wait on with others."""

PROBE_TIMEOUT = 10.0
"""Seconds after which a listener whose probe has not arrived is reported (one
warning). The probe is a notification the runtime sends a new listener through the
engine (the path a cancel takes) right after its LISTEN; until it arrives the listener
does not count as listening (`stats().listening` is False) and cancels are seen by
polling alone. A probe that never arrives means the listener hears nothing the
engine's connections send: a pooler in transaction mode sits between them."""

DEAF_WARNING = (
    "dbcancel: the listener of %s has not received the probe notification sent "
    "through the engine within %gs (does the engine reach the server through "
    "a pooler in transaction mode, such as PgBouncer?); cancels are seen by "
    "polling alone, within the interval. To have them pushed, pass "
    "listen_url= a direct connection to the server (not through the pooler)"
)
"""What a listener whose probe never arrived logs, once (both runtimes)."""

_RESTART_PAUSE = 0.05


@dataclass(frozen=True, slots=True)
class RuntimeStats:
    """The runtime's own state in this process (see `Jobs.stats`)."""

    running: bool
    """True while the runtime thread is alive."""
    restarts: int
    """Times the thread was found dead and started again."""
    databases: int
    """Databases the runtime serves now (jobs, beats or waiters)."""
    listeners: int
    """Listener connections to databases open now (at most one per database; Redis push
    uses none: one Redis connection per process and URL instead)."""
    connections: int = 0
    """Connections the runtime holds open now, over every database it serves: its
    listener connections plus the connections its polls, heartbeats and probes have
    checked out (at most one per database at a time)."""


class _Table:
    """What the runtime serves for one job table: its watched checkpoints and waiters."""

    def __init__(self, backend: Backend, health: Health, db: _Database | None = None) -> None:
        self.backend = backend
        self.health = health
        # Its database: whose lease its polls take (a table alone gets one of its own).
        self.db = db if db is not None else _Database(backend, [0, 0])
        # Each checkpoint with the number of holders that asked for it (a run, and an
        # asyncio block inside it, say): it is polled until the last one leaves.
        self.watched: dict[Checkpoint, int] = {}
        # wait() calls of this process, by the job id's text as notifications carry it.
        self.waiters: dict[str, set[Any]] = {}  # threading.Events, or loop bridges
        self.due = math.inf  # monotonic time of the next poll
        self.failures = 0
        self.listener: Listener | None = _listener_of(backend)
        # The listener this table's notifications arrive on: its own, or its
        # database's shared one when that one took over this table's channel.
        self.via: Listener | None = None

    def interval(self) -> float:
        return min((cp.interval for cp in self.watched), default=math.inf)

    def needs_listener(self) -> bool:
        return bool(self.watched or self.waiters)


class _Database:
    """One database's share of the runtime: its tables, heartbeat and listeners."""

    def __init__(self, backend: Backend, counts: list[int]) -> None:
        self.backend = backend  # the newest job's: surely an engine still in use
        self.label = backend.label
        self.tables: dict[Hashable, _Table] = {}
        self.periods: Counter[float] = Counter()
        self.beating = threading.Lock()
        # The lease: the runtime's polls, beats and probes of this database take turns
        # on it, so that they hold one connection at a time (see `borrow`).
        self.lease = threading.Lock()
        self.borrowed = False  # True while the lease's holder has a connection out
        # Backends that keep their connection between uses (Django's per thread one)
        # still hold it once the lease is given back, until released.
        self.keeps = bool(getattr(backend, "keeps_connection", False))
        self.kept = False
        self.beaten = -math.inf  # monotonic time of the last beat that worked
        self.tried = -math.inf  # ... and of the last one tried, for the schedule
        self.factor = rng.uniform(1.0, 1.0 + JITTER)
        self.recorded = math.inf  # the period the last beat recorded in the row
        # Beats and failed beats, kept by the runtime beyond this object's life (a
        # database is forgotten while idle; its counters are not).
        self.counts = counts
        self.beat_failing = False
        self.idle_since: float | None = None
        # Listener connections and their state, by listener.
        self.listeners: dict[Listener, _ListenerState] = {}

    def busy(self) -> bool:
        return bool(self.periods) or any(t.needs_listener() for t in self.tables.values())

    @contextlib.contextmanager
    def borrow(self) -> Any:
        """Hold the database's lease: the block is the runtime's only use of a
        connection of this database (others wait for it)."""
        with self.lease:
            self.borrowed = True
            try:
                yield
            finally:
                self.borrowed = False
                if self.keeps and threading.current_thread().name == "dbcancel-runtime":
                    self.kept = True

    def connections(self) -> int:
        """Connections the runtime holds open for this database now (a Redis push
        listener is none of them: it shares the process's Redis connection)."""
        listening = sum(
            1 for lst in self.listeners if lst.connected and not getattr(lst, "shared", False)
        )
        return listening + (1 if self.borrowed or self.kept else 0)

    def beat(self, *, fresh_within: float | None = None) -> bool:
        """Beat the worker row now (one beat at a time per database); True if it did.

        `fresh_within`: skip when a beat worked less than that many seconds ago.
        Raises what the backend raises.
        """
        with self.beating:
            started = time.monotonic()
            if fresh_within is not None and started - self.beaten < fresh_within:
                return False
            self.tried = started
            period = min(self.periods, default=fresh_within or DEFAULT_HEARTBEAT)
            with _timeouts.limit(_timeouts.POLL_TIMEOUT), self.borrow():
                _beat_worker(self.backend, period)
            # The row now promises a beat within MISSED_BEATS of this period: the next
            # one comes no later than this period, even once the job that asked for it
            # has left (a reaper trusts the promise, not the jobs running now).
            self.recorded = period
            self.beaten = started
            self.counts[0] += 1
            if _events.on:
                _events.emit("beat", self.label)
            return True

    def beat_logged(self, *, fresh_within: float | None = None) -> None:
        """Beat, logging a failure once per outage instead of raising it."""
        try:
            if not self.beat(fresh_within=fresh_within):
                return
            self.backend.release()
            if threading.current_thread().name == "dbcancel-runtime":
                self.kept = False
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

    def beat_due(self) -> float:
        """Monotonic time of the next beat; inf while no job runs."""
        if not self.periods:
            return math.inf
        return self.tried + min(min(self.periods), self.recorded) * self.factor


def _beat_worker(backend: Backend, period: float) -> None:
    """`backend.beat_worker(worker_id, period)`; a backend written for dbcancel 0.2
    takes the worker id alone (its rows then carry no expiry)."""
    beat: Callable[..., None] = backend.beat_worker
    if _takes_period(backend):
        beat(worker_id(), period)
    else:
        beat(worker_id())


def _takes_period(backend: Backend) -> bool:
    import inspect

    try:
        params = inspect.signature(backend.beat_worker).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len(params) >= 2


class _ListenerState:
    __slots__ = ("deaf", "failing", "failures", "probe_until", "reconnect_at", "tables")

    def __init__(self) -> None:
        self.tables: list[_Table] = []
        self.failures = 0
        self.failing = False
        self.reconnect_at = 0.0
        # While a probe is awaited: when to give up on it (inf otherwise).
        self.probe_until = math.inf
        self.deaf = False  # the last probe never arrived (warned once until one does)


def _heard(listener: Listener) -> bool:
    """True once `listener` has received its own probe (a listener that sends no
    probe counts as hearing while connected)."""
    heard = getattr(listener, "heard", None)
    return listener.connected and (heard is None or bool(heard))


def _listener_of(backend: Backend) -> Listener | None:
    """The backend's listener; None (poll only) when its driver cannot listen."""
    try:
        return backend.listener()
    except TypeError:
        log.debug("dbcancel: %s cannot listen for cancels; polling only", backend.label)
        return None


class Runtime:
    """The process's runtime; see the module docstring. Use `runtime()` to get it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ever_started = False
        self._stopping = False
        self._closing = False
        self._databases: dict[Hashable, _Database] = {}
        self._counts: dict[Hashable, list[int]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.restarts = 0

    # -- what jobs, checkpoints and waiters call --------------------------------------

    def watch(self, backend: Backend, health: Health, cp: Checkpoint) -> None:
        """Poll `cp` from the next poll of its table on (within its interval)."""
        with self._cond:
            table = self._table(backend, health)
            table.watched[cp] = table.watched.get(cp, 0) + 1
            due = time.monotonic() + cp.interval
            if due < table.due:
                table.due = due
            self._ensure_running()
        self._kick()

    def unwatch(self, backend: Backend, cp: Checkpoint) -> None:
        """Drop one hold on `cp`; it stops being polled when the last one is dropped."""
        with self._cond:
            db = self._databases.get(backend.worker_key)
            table = None if db is None else db.tables.get(backend.key)
            if table is None:
                return
            count = table.watched.pop(cp, 0) - 1
            if count > 0:
                table.watched[cp] = count
            elif not table.watched:
                table.due = math.inf
        self._kick()

    def join(self, backend: Backend, period: float) -> str:
        """Count a job about to start in `backend`'s database; return its worker id.

        The first job of an idle process beats at once, in the caller's thread, so the
        job never names a worker row that is missing or stale. Later ones join without
        a query. The job leaves with `leave()` once it has stopped.
        """
        with self._cond:
            db = self._database(backend)
            db.backend = backend
            db.periods[period] += 1
            # Fresh enough for this job only if the row's promise (the period its last
            # beat recorded) covers it: a shorter one may be about to expire.
            within = min(period, db.recorded)
            fresh = time.monotonic() - db.beaten < within
            if self._thread is not None:
                self._ensure_running()
        self._kick()
        if not fresh:
            try:
                db.beat(fresh_within=within)
            except BaseException:
                self.leave(backend, period)
                raise
        return worker_id()

    def leave(self, backend: Backend, period: float) -> None:
        """Count a job that has stopped (or did not start)."""
        with self._cond:
            db = self._databases.get(backend.worker_key)
            if db is None:
                return
            db.periods[period] -= 1
            if db.periods[period] <= 0:
                del db.periods[period]
        self._kick()

    def beat_if_due(self, backend: Backend) -> None:
        """Beat `backend`'s database now if its beat is due (from a threadless checkpoint:
        with no thread, the jobs' own checkpoints keep the worker row fresh)."""
        db = self._databases.get(backend.worker_key)
        if db is None or time.monotonic() < db.beat_due():
            return
        if db.beating.acquire(blocking=False):  # another thread beats: fine
            db.beating.release()
            db.beat_logged(fresh_within=min(db.periods, default=math.inf))

    def ensure_serving(self) -> None:
        """Start the thread again if it died while it had work (a checkpoint asks)."""
        with self._cond:
            if self._thread is not None:
                self._ensure_running()

    @contextlib.contextmanager
    def waiting(self, backend: Backend, job_id: Any, event: Any = None) -> Any:
        """A `threading.Event` set when a notification names `job_id` (its cancel, or its
        end), for the block; None when the database sends none (poll instead).

        `event`: any object with `set()` (and `clear()`) to use instead, such as a
        bridge to an `asyncio.Event`; this thread calls its `set()`."""
        with self._cond:
            db = self._databases.get(backend.worker_key)
            table = None if db is None else db.tables.get(backend.key)
        if table is None and _listener_of(backend) is None:
            # Nothing announces ends here: the caller polls, and the runtime keeps no
            # state (nor engine) for a database it has nothing to do for.
            yield None
            return
        with self._cond:
            table = self._table(backend, None)
            if table.listener is None:
                event = None
            else:
                event = threading.Event() if event is None else event
                table.waiters.setdefault(str(job_id), set()).add(event)
                self._ensure_running()
        if event is None:
            yield None
            return
        self._kick()
        try:
            yield event
        finally:
            with self._cond:
                events = table.waiters.get(str(job_id))
                if events is not None:
                    events.discard(event)
                    if not events:
                        del table.waiters[str(job_id)]

    def poll_soon(self, backend: Backend) -> None:
        """Poll `backend`'s table at once instead of at the end of the current wait."""
        with self._cond:
            db = self._databases.get(backend.worker_key)
            table = None if db is None else db.tables.get(backend.key)
            if table is not None and table.watched:
                table.due = 0.0
        self._kick()

    # -- what stats, tests and shutdown call ------------------------------------------

    def stats(self) -> RuntimeStats:
        """The thread's state, restarts, and what it serves."""
        with self._cond:
            thread = self._thread
            listeners = sum(
                1
                for db in self._databases.values()
                for lst in db.listeners
                if lst.connected and not getattr(lst, "shared", False)
            )
            return RuntimeStats(
                running=thread is not None and thread.is_alive(),
                restarts=self.restarts,
                databases=len(self._databases),
                listeners=listeners,
                connections=sum(db.connections() for db in self._databases.values()),
            )

    def connections(self, backend: Backend) -> int:
        """Connections the runtime holds open now for `backend`'s database: its
        listener, and the connection a poll, beat or probe has out (for `Jobs.stats`)."""
        with self._cond:
            db = self._databases.get(backend.worker_key)
            return 0 if db is None else db.connections()

    def table_stats(self, backend: Backend) -> tuple[bool, bool, int, int]:
        """For `Jobs.stats`: whether the table is served (thread alive) and listened
        to, and its database's beats and beat errors."""
        with self._cond:
            beats, errors = self._counts.get(backend.worker_key, (0, 0))
            db = self._databases.get(backend.worker_key)
            if db is None:
                return False, False, beats, errors
            table = db.tables.get(backend.key)
            alive = self._thread is not None and self._thread.is_alive()
            watching = alive and table is not None and bool(table.watched)
            via = None if table is None else table.via
            listening = via is not None and _heard(via)
            return watching, listening, beats, errors

    def database_of(self, backend: Backend) -> _Database | None:
        """The state of `backend`'s database, if served (for tests)."""
        with self._cond:
            return self._databases.get(backend.worker_key)

    def close_idle(self, timeout: float) -> list[str]:
        """Make the thread give back every idle database's connections now; return the
        labels of the databases still busy after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._close_everything_idle()
                return self._busy_labels()
            self._closing = True
        self._kick()
        with self._cond:
            self._cond.wait_for(
                lambda: not self._closing, timeout=max(0.0, deadline - time.monotonic())
            )
            self._closing = False
            return self._busy_labels()

    def stop(self, timeout: float) -> bool:
        """Stop the thread and close every connection; True once it has stopped."""
        with self._cond:
            thread = self._thread
            self._stopping = True
        self._kick()
        stopped = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            stopped = not thread.is_alive()
        with self._cond:
            if stopped:
                self._close_everything()
                self._thread = None
            self._stopping = False
        return stopped

    # -- internals (called with the condition held unless said otherwise) -------------

    def _database(self, backend: Backend) -> _Database:
        key = backend.worker_key
        db = self._databases.get(key)
        if db is None:
            counts = self._counts.setdefault(key, [0, 0])
            db = self._databases[key] = _Database(backend, counts)
        db.idle_since = None
        return db

    def _table(self, backend: Backend, health: Health | None) -> _Table:
        db = self._database(backend)
        table = db.tables.get(backend.key)
        if table is None:
            from ._health import health_for

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

    def _ensure_running(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._thread is not None:
            self.restarts += 1
            log.error(
                "dbcancel: the runtime thread had died; starting it again (restart %d)",
                self.restarts,
            )
        self._thread = threading.Thread(target=self._run, name="dbcancel-runtime", daemon=True)
        self._ever_started = True
        self._thread.start()

    def _kick(self) -> None:
        """Wake the thread from its wait (any thread may call this)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _drain_kicks(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _busy_labels(self) -> list[str]:
        return [db.label for db in self._databases.values() if db.busy()]

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                if not self._step(me):
                    return
            except BaseException:  # never die: a dead runtime stops every cancel
                with contextlib.suppress(BaseException):
                    log.exception("dbcancel: the runtime thread failed; going on")
                    time.sleep(_RESTART_PAUSE)

    def _step(self, me: threading.Thread) -> bool:
        """One round: do what is due, then wait for the next due time or a wake-up.

        Returns False when the thread must end (stop() was called, or another thread
        has replaced this one).
        """
        polls: list[_Table] = []
        beats: list[_Database] = []
        connects: list[tuple[_Database, Listener]] = []
        # Listeners that subscribe per job (Redis push), with the jobs to follow.
        follows: list[tuple[_Database, Listener, set[str]]] = []
        with self._cond:
            if self._stopping or self._thread is not me:
                return False
            now = time.monotonic()
            next_at = math.inf
            for key, db in list(self._databases.items()):
                if not db.busy():
                    next_at = min(next_at, self._idle(key, db, now))
                    continue
                db.idle_since = None
                for table in db.tables.values():
                    if table.watched:
                        if table.due <= now:
                            polls.append(table)
                        else:
                            next_at = min(next_at, table.due)
                due = db.beat_due()
                if due <= now:
                    beats.append(db)
                else:
                    next_at = min(next_at, due)
                for listener, state in self._listeners_wanted(db):
                    if listener.connected and state.probe_until < math.inf:
                        if _heard(listener):
                            state.probe_until = math.inf
                            self._heard_again(db, state)
                        elif state.probe_until <= now:
                            self._deaf(db, state)
                        else:
                            next_at = min(next_at, state.probe_until)
                    if callable(getattr(listener, "follow", None)):
                        follows.append((db, listener, _followed(state.tables)))
                    if listener.connected and not getattr(listener, "pending", False):
                        continue
                    if state.reconnect_at <= now:
                        connects.append((db, listener))
                    else:
                        next_at = min(next_at, state.reconnect_at)
            if self._closing:
                self._closing = False
                self._cond.notify_all()
        for db, listener in connects:
            self._connect(db, listener)
        for db, listener, job_ids in follows:
            self._follow(db, listener, job_ids)
        for table in polls:
            self._poll(table)
        for db in beats:
            db.beat_logged()
        if polls or beats or connects:
            return True
        self._wait(next_at)
        return True

    def _idle(self, key: Hashable, db: _Database, now: float) -> float:
        """An idle database: release its connection now, its listeners after the grace
        (at once when close_idle() asks), then forget it. Returns when to look again."""
        if db.idle_since is None:
            db.idle_since = now
            _release(db.backend)
            db.kept = False
        if self._closing or now - db.idle_since >= IDLE_GRACE:
            for listener in db.listeners:
                listener.close()
            for table in db.tables.values():
                _release(table.backend)
            del self._databases[key]
            return math.inf
        return db.idle_since + IDLE_GRACE

    def _listeners_wanted(self, db: _Database) -> list[tuple[Listener, _ListenerState]]:
        """The listeners `db` needs now: one shared by every table whose listener can
        take another table's channel, else one per table; tables map onto them."""
        wanted: list[tuple[Listener, _ListenerState]] = []
        shared: Listener | None = None
        for table in db.tables.values():
            if table.listener is None or not table.needs_listener():
                continue
            listener = table.listener
            if hasattr(listener, "add_channel"):
                if shared is None:
                    shared = next(
                        (lst for lst in db.listeners if hasattr(lst, "add_channel")), listener
                    )
                if shared is not listener:
                    shared.add_channel(listener)  # type: ignore[attr-defined]
                listener = shared
            state = db.listeners.get(listener)
            if state is None:
                state = db.listeners[listener] = _ListenerState()
            if table not in state.tables:
                state.tables.append(table)
            table.via = listener
            if (listener, state) not in wanted:
                wanted.append((listener, state))
        return wanted

    def _connect(self, db: _Database, listener: Listener) -> None:
        """Open a listener connection; poll its tables at once after it is up (a cancel
        committed before LISTEN took effect was announced to nobody)."""
        state = db.listeners[listener]
        try:
            if listener.connected:
                listener.listen_pending()  # type: ignore[attr-defined]
            else:
                listener.connect()
                self._probe(db, listener, state)
        except Exception:
            self._listen_failed(db, listener, state)
            return
        with self._cond:
            state.failures = 0
            for table in state.tables:
                if table.watched:
                    table.due = 0.0
                for events in table.waiters.values():
                    for event in events:
                        event.set()  # an end announced before LISTEN: read the row again
        if state.failing:
            state.failing = False
            log.warning("dbcancel: listening for cancels of %s again", db.label)
        # Notifications that arrived while a LISTEN ran wait in the driver, with nothing
        # left on the socket to wake a select(): take them in now.
        self._receive(db, listener, 0.0)

    def _probe(self, db: _Database, listener: Listener, state: _ListenerState) -> None:
        """Send the new listener its probe through the table's engine (the way a cancel
        goes); it counts as listening once the probe arrives (see `PROBE_TIMEOUT`).
        Raises what the backend raises."""
        channel = getattr(listener, "probe_channel", None)
        notify = getattr(db.backend, "notify", None)
        if channel is None or not callable(notify):
            if hasattr(listener, "heard"):
                # A backend that cannot send the probe: the listener is trusted as before.
                listener.heard = True
            return
        state.probe_until = time.monotonic() + PROBE_TIMEOUT
        with _timeouts.limit(_timeouts.POLL_TIMEOUT), db.borrow():
            notify(channel, "probe")
        self._kick()  # look at the listener's socket at once

    def _heard_again(self, db: _Database, state: _ListenerState) -> None:
        if state.deaf:
            state.deaf = False
            log.warning("dbcancel: the listener of %s receives notifications again", db.label)

    def _deaf(self, db: _Database, state: _ListenerState) -> None:
        """The probe has not arrived in time: say so once (the listener stays: should
        the probe arrive late, it counts as listening then). With the condition held."""
        state.probe_until = math.inf
        if not state.deaf:
            state.deaf = True
            log.warning(DEAF_WARNING, db.label, PROBE_TIMEOUT)

    def _follow(self, db: _Database, listener: Listener, job_ids: set[str]) -> None:
        """Have a listener that subscribes per job follow exactly `job_ids`."""
        try:
            listener.follow(job_ids)  # type: ignore[attr-defined]
        except Exception:
            with self._cond:
                state = db.listeners.get(listener)
            if state is not None:
                self._listen_failed(db, listener, state)

    def _listen_failed(self, db: _Database, listener: Listener, state: _ListenerState) -> None:
        state.probe_until = math.inf
        listener.close()
        for table in state.tables:
            table.health.count(listener_errors=1)
        state.failures += 1
        state.reconnect_at = time.monotonic() + min(0.1 * 2.0 ** (state.failures - 1), MAX_BACKOFF)
        if not state.failing:
            state.failing = True
            log.warning(
                "dbcancel: listening for cancels of %s failed; polling alone until it reconnects",
                db.label,
                exc_info=True,
            )

    def _poll(self, table: _Table) -> None:
        """Poll every watched job of `table` in one statement, and schedule the next."""
        with self._cond:
            cps = list(table.watched)
            interval = table.interval()
        if not cps:
            return
        stale_in = min((cp._stale_in() for cp in cps), default=math.inf)
        bound = min(_timeouts.POLL_TIMEOUT, max(stale_in, 0.1))

        def read(job_ids: Collection[Any]) -> Rows:
            with _timeouts.limit(bound), table.db.borrow():
                rows = table.backend.read_many(job_ids)
            return {job_id: (row.status, row_text(row)) for job_id, row in rows.items()}

        def still_watched(cp: Checkpoint) -> bool:
            with self._cond:
                return cp in table.watched

        try:
            poll_step(read, table.health, cps, still_polled=still_watched)
        except Exception:
            table.failures += 1
        else:
            table.failures = 0
        stale_in = min((cp._stale_in() for cp in cps), default=math.inf)
        delay = poll_delay(interval, table.failures, stale_in)
        with self._cond:
            table.due = time.monotonic() + delay if table.watched else math.inf

    def _wait(self, until: float) -> None:
        """Wait until `until` (monotonic), a kick, or a notification on a listener."""
        with self._cond:
            listeners = [
                (lst, db)
                for db in self._databases.values()
                for lst in db.listeners
                if lst.connected
            ]
        timeout = max(0.0, until - time.monotonic())
        # Several listeners may share one socket (Redis push: one connection per URL
        # for every table); each of them takes its share when it is readable.
        fds: dict[int, list[tuple[Listener, _Database]]] = {}
        blind: list[tuple[Listener, _Database]] = []
        for listener, db in listeners:
            fileno = getattr(listener, "fileno", None)
            fd = fileno() if callable(fileno) else None
            if fd is None:
                blind.append((listener, db))
            else:
                fds.setdefault(fd, []).append((listener, db))
        if blind:
            timeout = min(timeout, LISTEN_SLICE)
            for listener, db in blind:
                self._receive(db, listener, 0.0 if fds else timeout)
        if math.isinf(timeout):
            # Nothing due: wait for a kick or a notification. select() refuses an
            # infinite timeout (OverflowError), with listeners as without.
            timeout = 3600.0
        try:
            ready, _, _ = select.select([self._wake_r, *fds], [], [], timeout)
        except (OSError, ValueError):  # a listener closed meanwhile: look again
            ready = []
        if self._wake_r in ready:
            self._drain_kicks()
        for fd in ready:
            for listener, db in fds.get(fd, ()):
                self._receive(db, listener, 0.0)

    def _receive(self, db: _Database, listener: Listener, timeout: float) -> None:
        """Take in what `listener` received (waiting up to `timeout`)."""
        with self._cond:
            state = db.listeners.get(listener)
        if state is None:
            return
        try:
            receive = getattr(listener, "receive", None)
            if callable(receive):
                notes: list[tuple[str | None, str]] = list(receive(timeout))
            else:
                notes = [(None, p) for p in listener.wait(timeout) or ()]
        except Exception:
            self._listen_failed(db, listener, state)
            return
        if notes:
            self._dispatch(state.tables, notes)

    def _dispatch(self, tables: Iterable[_Table], notes: list[tuple[str | None, str]]) -> None:
        """Apply notifications: flip the checkpoints of cancelled jobs, wake waiters,
        and make the tables that need it poll now."""
        with self._cond:
            tables = list(tables)
            routed: list[tuple[_Table, str]] = []
            for channel, payload in notes:
                table = _route(tables, channel)
                if table is not None:
                    table.health.count(notifications=1)
                    routed.append((table, payload))
            by_id: dict[int, dict[str, list[Checkpoint]]] = {}
            for table, _ in routed:
                if id(table) not in by_id:
                    cps: dict[str, list[Checkpoint]] = {}
                    for cp in table.watched:
                        cps.setdefault(str(cp.job_id), []).append(cp)
                    by_id[id(table)] = cps
        for table, payload in routed:
            kind, job_id, reason = read_payload(payload)
            if kind == "cancel" and job_id is not None:
                # A payload is sent only by a committed cancel that changed the row: as
                # good as the row itself, so no confirming poll (and no second hand-off
                # of the GIL to a CPU-bound worker).
                for cp in by_id[id(table)].get(job_id, ()):
                    cp._observe(reason)
            elif kind == "cancel" or (kind == "poll" and _may_run_here(job_id, by_id[id(table)])):
                # Poll now: several jobs, a job of this process named without its
                # reason, or a payload that cannot be read. A job plainly named that runs
                # elsewhere needs no poll here: with a fleet on one channel (Redis push),
                # every process would poll for every cancel.
                with self._cond:
                    if table.watched:
                        table.due = 0.0
            with self._cond:
                if job_id is None:
                    events = [e for es in table.waiters.values() for e in es]
                else:
                    events = list(table.waiters.get(job_id, ()))
            for event in events:
                event.set()

    def _close_everything_idle(self) -> None:
        for key, db in list(self._databases.items()):
            if not db.busy():
                for listener in db.listeners:
                    listener.close()
                _release(db.backend)
                del self._databases[key]

    def _close_everything(self) -> None:
        for db in self._databases.values():
            for listener in db.listeners:
                listener.close()
            _release(db.backend)
        self._databases.clear()


def poll_delay(interval: float, failures: int, stale_in: float = math.inf) -> float:
    """Seconds from one poll of a table to the next: the interval, jittered, while
    polls work; after `failures` failed ones in a row, the one backoff rule of every
    poller, never past the moment (`stale_in` seconds away) a job would go stale."""
    if not failures:
        return interval * rng.uniform(1 - JITTER, 1 + JITTER)
    return max(0.0, min(backoff(interval, failures), stale_in))


def _followed(tables: Iterable[_Table]) -> set[str]:
    """The ids (as notifications name them) of the jobs `tables` run or wait for here."""
    ids = {str(cp.job_id) for table in tables for cp in table.watched}
    for table in tables:
        ids.update(table.waiters)
    return ids


def _may_run_here(job_id: str | None, running: Collection[str]) -> bool:
    """False only for a plain job id (not JSON that failed to parse) of no job in
    `running`, the ids of the jobs a table runs in this process."""
    if job_id is None or job_id in running:
        return True
    return not job_id or job_id[0] in '[{"' or job_id != job_id.strip()


def _channel_of(table: _Table) -> str | None:
    """The channel `table`'s notifications arrive under, once a listener resolved it;
    None for a listener that does not say (it then serves one table only)."""
    name = getattr(table.listener, "channel_name", None)
    if not callable(name):
        return None
    resolved = name()
    return None if resolved is None else str(resolved)


def _route(tables: list[_Table], channel: str | None) -> _Table | None:
    """The table of `tables` (those of one listener) a notification on `channel` is for."""
    if channel is None or len(tables) == 1:
        return tables[0] if len(tables) == 1 else None
    for table in tables:
        if _channel_of(table) == channel:
            return table
    return None


def _release(backend: Backend) -> None:
    try:
        backend.release()
    except Exception:  # a broken connection is as good as closed
        log.debug("dbcancel: closing a connection of %s failed", backend.label, exc_info=True)


_lock = threading.Lock()
_runtime: Runtime | None = None
# Runtimes inherited from the parent by a forked child: their thread does not exist
# there, and their listener connections are the parent's. Kept referenced so that they
# are never finalized (closed) from the child.
_orphans: list[Runtime] = []


def runtime() -> Runtime:
    """This process's runtime, created on first use (the thread starts when needed)."""
    global _runtime
    rt = _runtime
    if rt is not None:
        return rt
    with _lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime if it exists, without creating it."""
    return _runtime


def _reset_after_fork() -> None:
    global _lock, _runtime
    _lock = threading.Lock()
    if _runtime is not None:
        _orphans.append(_runtime)
    _runtime = None


os.register_at_fork(after_in_child=_reset_after_fork)
