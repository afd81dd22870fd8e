"""Status writes survive pooled connections that died while nobody was looking.

A database restart, ``pg_terminate_backend`` or MariaDB's ``KILL`` ends a server
session; the client's socket in the engine's pool does not know until its next use. An
engine without ``pool_pre_ping`` hands such a connection out, and its first statement
fails with a disconnect. Every write dbcancel makes is one conditional UPDATE whose row
count decides, so it can run again on a fresh connection: a finished job must never be
left looking alive (``in_progress``, ``finished_at`` null) because its final write met a
dead connection.

The workers here run in threads and wait on :class:`threading.Event` inside ``run()``
while the test kills their engine's connections (on the shared servers, by server
session id captured when each connection was opened) or restarts a throwaway server of
its own (:mod:`tests.integration.servers`). Several workers leave at once, as a real
pool's workers do, so several of them meet a dead connection. SQLite has no server
session to end: these tests run on PostgreSQL and MariaDB only.

Each test counts its disruptions (server sessions ended, server restarts), asserts it
made some (a test that killed nothing proves nothing) and reports them as the
``disruptions`` property of its result.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    MetaData,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from dbcancel import Jobs, Status
from dbcancel._liveness import worker_id
from dbcancel.models import worker_table
from tests.models import Analysis, Base, Result

from .servers import Server, throwaway

TABLE = Analysis.__table__
WORKERS = 5
JOIN_TIMEOUT = 60.0
SERVER_DATABASES = pytest.mark.parametrize(
    "database",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)


class Boom(Exception):
    """The worker's own failure."""


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Re-check ``predicate`` every 20 ms: for server-side states that send no event."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def server_id(dbapi_conn: Any) -> int:
    """The server's id of a DBAPI connection's session (backend pid, thread id)."""
    info = getattr(dbapi_conn, "info", None)
    pid = getattr(info, "backend_pid", None)  # psycopg
    if pid is not None:
        return int(pid)
    return int(dbapi_conn.thread_id())  # pymysql


class Killer:
    """Ends, from an admin engine, every server session an engine has opened so far.

    The ids are captured when each connection is opened, so the kill reaches exactly the
    pooled connections of that engine and nothing else on the shared server.
    """

    def __init__(self, name: str, engine: Engine, admin: Engine) -> None:
        self.name = name
        self.engine = engine
        self.admin = admin
        self.kills = 0
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._connected)

    def _connected(self, dbapi_conn: Any, record: Any) -> None:
        with self._lock:
            self._ids.add(server_id(dbapi_conn))

    def _alive(self, conn: Any, ids: list[int]) -> list[int]:
        if self.name == "postgresql":
            stmt = text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:ids)")
        else:
            stmt = text(
                "SELECT id FROM information_schema.processlist WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True))
        return [int(i) for i in conn.execute(stmt, {"ids": ids}).scalars()]

    def kill(self) -> int:
        """End every session of the engine that is still open; return how many."""
        with self._lock:
            ids = sorted(self._ids)
            self._ids.clear()
        if not ids:
            return 0
        with self.admin.connect() as conn:
            alive = self._alive(conn, ids)
            for session in alive:
                if self.name == "postgresql":
                    # With a timeout, returns once the backend has exited.
                    ended = conn.execute(
                        text("SELECT pg_terminate_backend(:pid, 60000)"), {"pid": session}
                    ).scalar_one()
                    if not ended:
                        # False too when it had exited by itself since the list was read;
                        # pg_stat_activity is a snapshot per transaction: read a new one.
                        conn.commit()
                        assert not self._alive(conn, [session]), f"backend {session} did not exit"
                else:
                    conn.execute(text(f"KILL CONNECTION {int(session)}"))
            conn.commit()
            if self.name == "mariadb":

                def gone() -> bool:
                    still = self._alive(conn, alive)
                    conn.commit()  # a fresh snapshot of the process list next time
                    return not still

                wait_until(gone, 30, "the killed MariaDB sessions to exit")
        self.kills += len(alive)
        return len(alive)

    def close(self) -> None:
        event.remove(self.engine, "connect", self._connected)


def fill_pool(engine: Engine, size: int) -> None:
    """Open ``size`` connections at once and return them to the pool, so that ``size``
    threads leaving together each take one of them."""
    conns = [engine.connect() for _ in range(size)]
    for conn in conns:
        conn.execute(select(1))
    for conn in conns:
        conn.close()


@dataclass
class Worker:
    """One job run in a thread: enters ``run()``, waits for ``go``, leaves in its ``kind``.

    ``kind``: ``complete`` (a normal exit), ``fail`` (raises :class:`Boom`), ``cancel``
    (sees a cancel made elsewhere, then raises its own :class:`Cancelled`), ``complete_in``
    (writes a result and calls ``cp.complete()`` in the application's own transaction).
    """

    jobs: Jobs
    job: int
    kind: str
    go: threading.Event
    results: Engine | None = None  # the application's engine, for complete_in
    entered: threading.Event = field(default_factory=threading.Event)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    cancel_sent: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    returned: bool = False
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"worker-{self.job}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:
                self.entered.set()
                if self.kind == "cancel":
                    assert self.cancel_sent.wait(JOIN_TIMEOUT)
                    cp.poll()  # reads the row while the connection is still alive
                    assert cp.cancelled
                    self.cancel_seen.set()
                assert self.go.wait(JOIN_TIMEOUT), "never told to leave"
                if self.kind == "fail":
                    raise Boom(f"job {self.job} failed")
                if self.kind == "cancel":
                    cp()  # raises this job's Cancelled, which run() swallows
                    raise AssertionError("the cancel was not raised")
                if self.kind == "complete_in":
                    assert self.results is not None
                    with Session(self.results) as session, session.begin():
                        session.add(Result(analysis_id=self.job, value="done"))
                        cp.complete(session)
            self.returned = True
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(JOIN_TIMEOUT)
        assert not self.thread.is_alive(), f"worker of job {self.job} never finished"


EXPECTED = {
    "complete": Status.COMPLETED,
    "fail": Status.FAILED,
    "cancel": Status.CANCELLED,
    "complete_in": Status.COMPLETED,
}


def check_outcomes(engine: Engine, workers: list[Worker]) -> None:
    """Each job ends where its worker left it, stopped; no job is left in progress."""
    problems = []
    for w in workers:
        if w.kind == "fail":
            if not isinstance(w.error, Boom):
                problems.append(f"job {w.job} ({w.kind}): the worker got {w.error!r}, not Boom")
        elif not w.returned:
            problems.append(f"job {w.job} ({w.kind}): the worker got {w.error!r}")
    ids = [w.job for w in workers]
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(TABLE.c.id, TABLE.c.status, TABLE.c.finished_at, TABLE.c.error).where(
                    TABLE.c.id.in_(ids)
                )
            )
        }
        in_progress = conn.execute(
            select(func.count()).where(TABLE.c.status == Status.IN_PROGRESS.value)
        ).scalar_one()
        results = set(
            conn.execute(select(Result.analysis_id).where(Result.analysis_id.in_(ids))).scalars()
        )
    for w in workers:
        row = rows[w.job]
        if row.status != EXPECTED[w.kind].value or row.finished_at is None:
            problems.append(
                f"job {w.job} ({w.kind}): {row.status}, finished_at {row.finished_at}, "
                f"expected {EXPECTED[w.kind].value} and stopped"
            )
        if w.kind == "fail" and "Boom" not in (row.error or ""):
            problems.append(f"job {w.job}: error {row.error!r} does not name Boom")
        if w.kind == "complete_in" and w.job not in results:
            problems.append(f"job {w.job}: its result was not committed")
    if in_progress:
        problems.append(f"{in_progress} row(s) still in_progress")
    assert not problems, "\n".join(problems)


def run_workers(
    jobs: Jobs,
    job_ids: list[int],
    kinds: list[str],
    *,
    disrupt: Callable[[], None],
    client: Jobs,
    results: Engine | None = None,
) -> list[Worker]:
    """Enter ``run()`` in one thread per job, cancel the ``cancel`` kinds through
    ``client``, ``disrupt`` the database, then let every worker leave at once."""
    go = threading.Event()
    workers = [
        Worker(jobs, job, kind, go, results=results)
        for job, kind in zip(job_ids, kinds, strict=True)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            assert w.entered.wait(JOIN_TIMEOUT), f"job {w.job} never entered run()"
        for w in workers:
            if w.kind == "cancel":
                assert client.cancel(w.job, reason="from elsewhere")
                w.cancel_sent.set()
                assert w.cancel_seen.wait(JOIN_TIMEOUT), f"job {w.job} never saw its cancel"
        disrupt()
    finally:
        go.set()
        for w in workers:
            if w.thread is not None:
                w.join()
    return workers


# -- killed sessions on the shared servers -------------------------------------------------


@pytest.fixture
def worker_engine(db: Any) -> Iterator[Engine]:
    """An engine as an application might configure it: default pool, no pre-ping."""
    engine = create_engine(db.url)
    yield engine
    engine.dispose()


@pytest.fixture
def killer(db: Any, worker_engine: Engine) -> Iterator[Killer]:
    k = Killer(db.name, worker_engine, db.engine)
    yield k
    k.close()


@SERVER_DATABASES
@pytest.mark.parametrize("kind", ["complete", "fail", "cancel", "complete_in"])
def test_run_exit_survives_killed_pooled_connections(
    db, worker_engine, killer, kind, record_property
):
    """The sessions of the worker engine's pool are ended between enter and exit.

    Every worker leaves at once, each taking one of the killed connections: the exit's
    write must still record how the job ended. ``complete_in`` writes its result in the
    application's own (pre-pinging) engine; only dbcancel's final write meets a dead
    connection.
    """
    jobs = Jobs(worker_engine, Analysis, interval=3600)
    client = db.jobs()
    job_ids = [db.add() for _ in range(WORKERS)]
    fill_pool(worker_engine, WORKERS)
    workers = run_workers(
        jobs,
        job_ids,
        [kind] * WORKERS,
        disrupt=killer.kill,
        client=client,
        results=db.engine,
    )
    record_property("disruptions", killer.kills)
    print(f"{db.name} run exit {kind}: {killer.kills} session(s) killed")
    assert killer.kills >= 1
    check_outcomes(db.engine, workers)


@SERVER_DATABASES
def test_mixed_exits_survive_killed_pooled_connections(db, worker_engine, killer, record_property):
    """Completions, failures and cancels leave together after one kill, three times over."""
    jobs = Jobs(worker_engine, Analysis, interval=3600)
    client = db.jobs()
    kinds = ["complete", "fail", "cancel", "complete", "fail", "cancel"]
    for _ in range(3):
        job_ids = [db.add() for _ in kinds]
        fill_pool(worker_engine, len(kinds))
        workers = run_workers(
            jobs, job_ids, kinds, disrupt=killer.kill, client=client, results=db.engine
        )
        check_outcomes(db.engine, workers)
    record_property("disruptions", killer.kills)
    print(f"{db.name} mixed exits: {killer.kills} session(s) killed")
    assert killer.kills >= 3


def together(calls: list[Callable[[], object]]) -> list[object]:
    """Run ``calls`` in threads released at once; their results, or the exceptions raised."""
    barrier = threading.Barrier(len(calls))
    out: list[object] = [None] * len(calls)

    def main(i: int) -> None:
        try:
            barrier.wait(JOIN_TIMEOUT)
            out[i] = calls[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
    return out


def _in_progress_rows(db: Any, count: int, *, stale: bool = False, **values: Any) -> list[int]:
    ids = [db.add(**values) for _ in range(count)]
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    stamp = long_ago if stale else dt.datetime.now(dt.UTC)
    with db.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id.in_(ids))
            .values(status=Status.IN_PROGRESS.value, started_at=stamp, heartbeat_at=stamp)
        )
    return ids


@SERVER_DATABASES
def test_cancel_survives_killed_pooled_connections(db, worker_engine, killer, record_property):
    """Five cancels from a client whose pooled sessions were all ended, at once."""
    client = Jobs(worker_engine, Analysis, interval=3600)
    ids = _in_progress_rows(db, WORKERS)
    fill_pool(worker_engine, WORKERS)
    killer.kill()
    outcomes = together([lambda job=job: client.cancel(job, reason="stop") for job in ids])
    record_property("disruptions", killer.kills)
    print(f"{db.name} cancel: {killer.kills} session(s) killed")
    assert killer.kills >= 1
    assert outcomes == [True] * WORKERS
    assert [db.row(job).status for job in ids] == [Status.CANCELLED] * WORKERS


@SERVER_DATABASES
def test_cancel_where_and_reap_survive_killed_pooled_connections(
    db, worker_engine, killer, record_property
):
    """cancel_where and reap, each the first call after its client's sessions were ended."""
    client = Jobs(worker_engine, Analysis, interval=3600)
    doomed = _in_progress_rows(db, WORKERS, session_id="doomed")
    fill_pool(worker_engine, 2)
    killer.kill()
    assert client.cancel_where(session_id="doomed") == WORKERS
    assert [db.row(job).status for job in doomed] == [Status.CANCELLED] * WORKERS

    lost = _in_progress_rows(db, WORKERS, stale=True, session_id="lost")
    fill_pool(worker_engine, 2)
    killer.kill()
    assert client.reap(stale_after=60) == WORKERS
    rows = [db.row(job) for job in lost]
    assert [r.status for r in rows] == [Status.FAILED] * WORKERS
    assert all(r.finished_at is not None for r in rows)
    record_property("disruptions", killer.kills)
    print(f"{db.name} cancel_where + reap: {killer.kills} session(s) killed")
    assert killer.kills >= 2


@SERVER_DATABASES
def test_status_survives_killed_pooled_connections(db, worker_engine, killer, record_property):
    """Five status reads from a client whose pooled sessions were all ended, at once."""
    client = Jobs(worker_engine, Analysis, interval=3600)
    ids = _in_progress_rows(db, WORKERS)
    fill_pool(worker_engine, WORKERS)
    killer.kill()
    outcomes = together([lambda job=job: client.status(job) for job in ids])
    record_property("disruptions", killer.kills)
    print(f"{db.name} status: {killer.kills} session(s) killed")
    assert killer.kills >= 1
    assert outcomes == [Status.IN_PROGRESS] * WORKERS


def _own_url(db: Any) -> str:
    """The session database's URL with a connection name of its own: a distinct key, so
    that the watcher of this test's table is this test's, on this test's engine."""
    name = f"dbcancel-faults-{uuid.uuid4().hex[:8]}"
    param = "application_name" if db.name == "postgresql" else "program_name"
    url = make_url(db.url).update_query_dict({param: name})
    return url.render_as_string(hide_password=False)


@SERVER_DATABASES
def test_heartbeats_survive_killed_pooled_connections(db, record_property):
    """The process's heartbeat and the watcher's poll meet a killed connection, three
    times, and never fail: each time they run again on a fresh connection."""
    engine = create_engine(_own_url(db))  # default pool, no pre-ping
    killer = Killer(db.name, engine, db.engine)
    jobs = Jobs(engine, Analysis, interval=0.2, watch=True, heartbeat=0.2)
    job = db.add()
    workers = worker_table(MetaData())

    def heartbeat() -> dt.datetime | None:
        with db.engine.connect() as conn:
            return conn.execute(
                select(workers.c.heartbeat_at).where(workers.c.id == worker_id())
            ).scalar()

    try:
        with jobs.run(job) as cp:
            assert cp.watched
            started = heartbeat()
            assert started is not None
            wait_until(lambda: heartbeat() > started, 10, "the first heartbeat")
            for _ in range(3):
                before = heartbeat()
                assert killer.kill() >= 1
                wait_until(lambda b=before: heartbeat() > b, 10, "a heartbeat after the kill")
            stats = jobs.stats()
            errors = stats.poll_errors + stats.heartbeat_errors
        assert db.row(job).status is Status.COMPLETED
    finally:
        killer.close()
        engine.dispose()
    record_property("disruptions", killer.kills)
    print(f"{db.name} heartbeats: {killer.kills} session(s) killed")
    assert errors == 0, f"{errors} heartbeat(s) or poll(s) failed on a killed connection"


# -- restarts of a throwaway server -------------------------------------------------------


@pytest.fixture(scope="module")
def postgresql_server() -> Iterator[Server]:
    server = throwaway("postgresql")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def mariadb_server() -> Iterator[Server]:
    server = throwaway("mariadb")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A throwaway server with an empty job table."""
    srv: Server = request.getfixturevalue(f"{request.param}_server")
    admin = create_engine(srv.url, poolclass=NullPool)
    try:
        Base.metadata.drop_all(admin)
        Base.metadata.create_all(admin)
        yield srv
    finally:
        admin.dispose()


@pytest.mark.slow
def test_run_exits_survive_a_server_restart(server, record_property):
    """Workers enter, the server restarts, then they all leave: twice."""
    engine = create_engine(server.url)  # default pool, no pre-ping
    checker = create_engine(server.url, poolclass=NullPool)
    jobs = Jobs(engine, Analysis, interval=3600)
    client = Jobs(checker, Analysis, interval=3600)
    kinds = ["complete", "fail", "cancel", "complete_in", "complete", "fail"]
    restarts = server.restarts
    try:
        for _ in range(2):
            with Session(checker) as s, s.begin():
                jobs_rows = [Analysis() for _ in kinds]
                s.add_all(jobs_rows)
                s.flush()
                job_ids = [j.id for j in jobs_rows]
            fill_pool(engine, len(kinds))
            workers = run_workers(
                jobs, job_ids, kinds, disrupt=server.restart, client=client, results=checker
            )
            check_outcomes(checker, workers)
    finally:
        engine.dispose()
        checker.dispose()
    made = server.restarts - restarts
    record_property("disruptions", made)
    print(f"{server.name} run exits: {made} restart(s)")
    assert made == 2


@pytest.mark.slow
def test_client_calls_survive_a_server_restart(server, record_property):
    """cancel, cancel_where and reap, at once, on a client pool that predates a restart."""
    engine = create_engine(server.url)  # default pool, no pre-ping
    checker = create_engine(server.url, poolclass=NullPool)
    client = Jobs(engine, Analysis, interval=3600)
    restarts = server.restarts
    try:
        with Session(checker) as s, s.begin():
            one = Analysis(status=Status.IN_PROGRESS.value)
            many = [Analysis(session_id="many") for _ in range(3)]
            long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
            lost = Analysis(
                status=Status.IN_PROGRESS.value, started_at=long_ago, heartbeat_at=long_ago
            )
            s.add_all([one, *many, lost])
            s.flush()
            one_id, lost_id = one.id, lost.id
            many_ids = [j.id for j in many]
        fill_pool(engine, 3)
        server.restart()
        outcomes = together(
            [
                lambda: client.cancel(one_id),
                lambda: client.cancel_where(session_id="many"),
                lambda: client.reap(stale_after=60),
            ]
        )
        assert outcomes == [True, 3, 1]
        with Session(checker) as s:
            assert s.get(Analysis, one_id).status == Status.CANCELLED
            assert all(s.get(Analysis, i).status == Status.CANCELLED for i in many_ids)
            reaped = s.get(Analysis, lost_id)
            assert reaped.status == Status.FAILED
            assert reaped.finished_at is not None
    finally:
        engine.dispose()
        checker.dispose()
    made = server.restarts - restarts
    record_property("disruptions", made)
    print(f"{server.name} client calls: {made} restart(s)")
    assert made == 1
