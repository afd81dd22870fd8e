"""The shared contract: the same tests against every backend of ``Jobs``.

Every test here takes the ``backend`` fixture, parametrized over (backend x database):
SQLAlchemy ``Jobs`` and ``DjangoJobs``, each on SQLite, PostgreSQL and MariaDB, and
``Jobs.from_backend`` on the standard library's sqlite3 (``sqlite3_backend.py``, written
against the public seam of ``dbcancel.backend`` alone), on SQLite. The first two work in
pytest-django's test database of that server, each on its own tables (the SQLAlchemy
models of ``tests/models.py``, the Django ones of the test app), so the contract tests
leave the rest of the suite's databases alone; the sqlite3 one in a file of its own. A
test states the contract once, through :class:`Backend`, which hides only how rows are
inserted, read and changed behind dbcancel's back; everything under test is ``Jobs``'
public API.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, select, update
from sqlalchemy.orm import sessionmaker

from dbcancel import TRANSITIONS, Cancelled, InvalidTransition, JobNotFound, Jobs, Status
from dbcancel._liveness import worker_id
from dbcancel.backend import MISSED_BEATS, WORKER_LOST
from dbcancel.models import WORKER_TABLE, worker_table
from dbcancel.testing import FakeClock
from tests.contract import asyncio_backend, sqlite3_backend
from tests.contrib.django import settings as django_settings
from tests.models import Analysis as SqlAnalysis
from tests.models import Base
from tests.models import Result as SqlResult

DATABASES = ("sqlite", "postgresql", "mariadb")
KINDS = ("sqlalchemy", "django", "asyncio")
"""The backends dbcancel ships, each run on every database (`asyncio`: `AsyncJobs` on
aiosqlite, asyncpg and aiomysql, and on psycopg's async mode as `asyncio-psycopg`)."""
INTERVAL = 0.05
SLACK = dt.timedelta(seconds=2)
JOIN_TIMEOUT = 60
TABLE = SqlAnalysis.__table__
WORKERS = worker_table(Base.metadata)
OTHER = "other-host:"
"""How the worker rows of other (made-up) processes that a test inserts begin."""


def case(kind: str, name: str) -> Any:
    marks: list[Any] = [getattr(pytest.mark, name)]
    if kind == "sqlite3":
        pass  # a file of its own: no Django database involved
    elif django_settings.unreachable(name) is None:
        # Django creates the test database both backends use; workers run in other
        # threads, which only see committed rows.
        alias = django_settings.ALIASES[name]
        marks.append(pytest.mark.django_db(transaction=True, databases=[alias]))
    return pytest.param((kind, name), marks=marks, id=f"{kind}-{name}")


# The sqlite3 backend of the tests speaks SQLite only.
CASES = [case(kind, name) for kind in KINDS for name in DATABASES] + [
    case("sqlite3", "sqlite"),
    case("asyncio-psycopg", "postgresql"),
]


def check_reachable(name: str) -> None:
    reason = django_settings.unreachable(name)
    if reason is None:
        return
    if django_settings.IN_CI:
        pytest.fail(f"{reason} (under CI=true every database must be up)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sqlalchemy_engines(django_db_setup: None) -> Iterator[dict[str, Any]]:
    """SQLAlchemy engines on pytest-django's test databases, by alias, made on demand.

    Disposed before pytest-django drops the databases (this fixture depends on it).
    """
    engines: dict[str, Any] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


def sqlalchemy_url(alias: str) -> Any:
    """The URL of the test database behind ``alias``, as pytest-django has named it."""
    from django.db import connections
    from sqlalchemy.engine import URL

    entry = connections[alias].settings_dict
    if entry["ENGINE"].endswith("sqlite3"):
        return URL.create("sqlite", database=entry["NAME"])
    return URL.create(
        "postgresql+psycopg" if alias == "postgresql" else "mysql+pymysql",
        username=entry["USER"] or None,
        password=entry["PASSWORD"] or None,
        host=entry["HOST"],
        port=int(entry["PORT"]) if entry["PORT"] else None,
        database=entry["NAME"],
    )


# -- the two backends behind one face ------------------------------------------------------


class Backend:
    """What a test needs besides ``Jobs`` itself: rows to work on and a look at them."""

    name: str

    def jobs(self, **kwargs: Any) -> Jobs:
        raise NotImplementedError

    def add(self, **values: Any) -> Any:
        """Insert one job (pending unless ``status`` is given); return its id."""
        raise NotImplementedError

    def row(self, job_id: Any) -> dict[str, Any] | None:
        """Every dbcancel column of the job, as the database has it now."""
        raise NotImplementedError

    def force(self, job_id: Any, **values: Any) -> None:
        """Change the row behind dbcancel's back, as another process or actor would."""
        raise NotImplementedError

    def delete(self, job_id: Any) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
        """An open transaction: yields ``cp.complete``'s argument and a result writer."""
        raise NotImplementedError
        yield

    def results(self, job_id: Any) -> list[str]:
        raise NotImplementedError

    def add_worker(
        self, worker: str, heartbeat_at: dt.datetime, expires_at: dt.datetime | None = None
    ) -> None:
        """Insert a row in the worker table, as another process's heartbeat would (an
        earlier dbcancel's, without ``expires_at``, unless it is given)."""
        raise NotImplementedError

    def heartbeat(self, worker: str) -> dt.datetime | None:
        """The ``heartbeat_at`` of a worker row; None when there is no such row."""
        raise NotImplementedError

    def expiry(self, worker: str) -> dt.datetime | None:
        """The ``expires_at`` of a worker row (which must exist)."""
        raise NotImplementedError

    def seam(self) -> Any:
        """A new backend object of this kind (what ``Jobs`` talks to) on the same table."""
        raise NotImplementedError

    def age_worker(self, worker: str, seconds: float) -> None:
        """Move every time of a worker row ``seconds`` into the past, as that much time
        passing on the database's clock without a beat would."""
        raise NotImplementedError

    def clear(self) -> None:
        """Empty the tables after a test."""


COLUMNS = (
    "status",
    "cancel_requested_at",
    "cancel_reason",
    "cancel_observed_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "error",
    "worker_id",
    "attempts",
    "user_id",
    "session_id",
)


class SQLAlchemyBackend(Backend):
    def __init__(self, name: str, engines: dict[str, Any]) -> None:
        alias = django_settings.ALIASES[name]
        self.name = name
        if alias not in engines:
            engine = create_engine(
                sqlalchemy_url(alias),
                **({"connect_args": {"timeout": 30}} if name == "sqlite" else {}),
            )
            Base.metadata.create_all(engine)
            engines[alias] = engine
        self.engine = engines[alias]
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def jobs(self, **kwargs: Any) -> Jobs:
        kwargs.setdefault("interval", INTERVAL)
        return Jobs(self.engine, SqlAnalysis, **kwargs)

    def add(self, **values: Any) -> Any:
        with self.sessions.begin() as session:
            job = SqlAnalysis(**values)
            session.add(job)
            session.flush()
            return job.id

    def row(self, job_id: Any) -> dict[str, Any] | None:
        cols = [TABLE.c[name] for name in COLUMNS]
        with self.engine.connect() as conn:
            row = conn.execute(select(*cols).where(TABLE.c.id == job_id)).mappings().first()
        return None if row is None else dict(row)

    def force(self, job_id: Any, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(TABLE).where(TABLE.c.id == job_id).values(**values))

    def delete(self, job_id: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(TABLE).where(TABLE.c.id == job_id))

    @contextmanager
    def transaction(self) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
        with self.sessions.begin() as session:

            def write(job_id: Any, value: str) -> None:
                session.add(SqlResult(analysis_id=job_id, value=value))
                session.flush()

            yield session, write

    def results(self, job_id: Any) -> list[str]:
        with self.engine.connect() as conn:
            stmt = select(SqlResult.value).where(SqlResult.analysis_id == job_id)
            return list(conn.execute(stmt).scalars())

    def add_worker(
        self, worker: str, heartbeat_at: dt.datetime, expires_at: dt.datetime | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                WORKERS.insert().values(
                    id=worker,
                    started_at=heartbeat_at,
                    heartbeat_at=heartbeat_at,
                    expires_at=expires_at,
                )
            )

    def heartbeat(self, worker: str) -> dt.datetime | None:
        with self.engine.connect() as conn:
            stmt = select(WORKERS.c.heartbeat_at).where(WORKERS.c.id == worker)
            return conn.execute(stmt).scalar()

    def expiry(self, worker: str) -> dt.datetime | None:
        with self.engine.connect() as conn:
            stmt = select(WORKERS.c.expires_at).where(WORKERS.c.id == worker)
            return conn.execute(stmt).scalar_one()

    def seam(self) -> Any:
        from dbcancel._sqla import SQLAlchemyBackend as Seam

        return Seam(self.engine, SqlAnalysis)

    def age_worker(self, worker: str, seconds: float) -> None:
        stamps = [c for c in WORKERS.c if isinstance(c.type, type(WORKERS.c.heartbeat_at.type))]
        with self.engine.begin() as conn:
            row = conn.execute(select(*stamps).where(WORKERS.c.id == worker)).mappings().one()
            older = {k: v - dt.timedelta(seconds=seconds) for k, v in row.items() if v}
            conn.execute(update(WORKERS).where(WORKERS.c.id == worker).values(**older))

    def clear(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(SqlResult))
            conn.execute(delete(TABLE))
            conn.execute(delete(WORKERS).where(WORKERS.c.id.like(f"{OTHER}%")))


class AsyncioBackend(SQLAlchemyBackend):
    """`AsyncJobs` on an `AsyncEngine` of the same test database; rows are inserted and
    looked at through the synchronous engine, as by another part of the application."""

    def __init__(
        self, name: str, driver: str, engines: dict[str, Any], loop: asyncio_backend.LoopThread
    ) -> None:
        super().__init__(name, engines)
        self.loop = loop
        key = f"async:{driver}"
        if key not in engines:
            engines[key] = asyncio_backend.async_engine(
                sqlalchemy_url(django_settings.ALIASES[name]), driver
            )
        self.async_engine = engines[key]

    def jobs(self, **kwargs: Any) -> Any:
        if "clock" in kwargs:
            pytest.skip("AsyncJobs always watches on real time: no custom clock")
        if kwargs.pop("watch", True) is False:
            pytest.skip("AsyncJobs has no threadless mode: its loop polls the running jobs")
        kwargs.setdefault("interval", INTERVAL)
        return asyncio_backend.make_jobs(self.async_engine, self.loop, **kwargs)

    @contextmanager
    def transaction(self) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
        with asyncio_backend.transaction(self.async_engine, self.loop) as opened:
            yield opened

    def seam(self) -> Any:
        pytest.skip("the seam under AsyncJobs is the SQLAlchemy backend, tested as such")


class DjangoBackend(Backend):
    def __init__(self, name: str) -> None:
        from tests.contrib.django.testapp.models import Analysis, Result

        self.name = name
        self.alias = django_settings.ALIASES[name]
        self.analyses = Analysis.objects.using(self.alias)
        self.result_rows = Result.objects.using(self.alias)

    def jobs(self, **kwargs: Any) -> Jobs:
        from dbcancel.contrib.django import DjangoJobs
        from tests.contrib.django.testapp.models import Analysis

        kwargs.setdefault("interval", INTERVAL)
        return DjangoJobs(Analysis, using=self.alias, **kwargs)

    def add(self, **values: Any) -> Any:
        return self.analyses.create(**values).pk

    def row(self, job_id: Any) -> dict[str, Any] | None:
        row = self.analyses.filter(pk=job_id).values(*COLUMNS).first()
        if row is not None:
            row["status"] = Status(row["status"])
        return row

    def force(self, job_id: Any, **values: Any) -> None:
        values = {k: v.value if isinstance(v, Status) else v for k, v in values.items()}
        self.analyses.filter(pk=job_id).update(**values)

    def delete(self, job_id: Any) -> None:
        self.analyses.filter(pk=job_id).delete()

    @contextmanager
    def transaction(self) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
        from django.db import transaction

        with transaction.atomic(using=self.alias):

            def write(job_id: Any, value: str) -> None:
                self.result_rows.create(analysis_id=job_id, value=value)

            yield self.alias, write

    def results(self, job_id: Any) -> list[str]:
        return list(self.result_rows.filter(analysis_id=job_id).values_list("value", flat=True))

    def add_worker(
        self, worker: str, heartbeat_at: dt.datetime, expires_at: dt.datetime | None = None
    ) -> None:
        from dbcancel.contrib.django.models import Worker

        Worker.objects.using(self.alias).create(
            id=worker, started_at=heartbeat_at, heartbeat_at=heartbeat_at, expires_at=expires_at
        )

    def heartbeat(self, worker: str) -> dt.datetime | None:
        from dbcancel.contrib.django.models import Worker

        row = Worker.objects.using(self.alias).filter(pk=worker).first()
        return None if row is None else row.heartbeat_at

    def expiry(self, worker: str) -> dt.datetime | None:
        from dbcancel.contrib.django.models import Worker

        expires_at: dt.datetime | None = Worker.objects.using(self.alias).get(pk=worker).expires_at
        return expires_at

    def seam(self) -> Any:
        from dbcancel.contrib.django.backend import DjangoBackend as Seam
        from tests.contrib.django.testapp.models import Analysis

        return Seam(Analysis, self.alias)

    def age_worker(self, worker: str, seconds: float) -> None:
        from django.db.models import DateTimeField

        from dbcancel.contrib.django.models import Worker

        stamps = [f.name for f in Worker._meta.concrete_fields if isinstance(f, DateTimeField)]
        rows = Worker.objects.using(self.alias).filter(pk=worker)
        older = {
            k: v - dt.timedelta(seconds=seconds) for k, v in rows.values(*stamps).get().items() if v
        }
        rows.update(**older)


class Sqlite3Backend(Backend):
    """``Jobs.from_backend`` on the sqlite3 backend of ``sqlite3_backend.py``."""

    def __init__(self, path: Path) -> None:
        self.name = "sqlite"
        self.path = path

    def connect(self) -> Any:
        return closing(sqlite3.connect(self.path, timeout=30))

    def jobs(self, **kwargs: Any) -> Jobs:
        kwargs.setdefault("interval", INTERVAL)
        return sqlite3_backend.jobs(self.path, **kwargs)

    def add(self, **values: Any) -> Any:
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        sql = (
            f"INSERT INTO analysis ({names}) VALUES ({marks})"
            if values
            else ("INSERT INTO analysis DEFAULT VALUES")
        )
        with self.connect() as conn, conn:
            cursor = conn.execute(sql, [sqlite3_backend.to_db(v) for v in values.values()])
            return cursor.lastrowid

    def row(self, job_id: Any) -> dict[str, Any] | None:
        with self.connect() as conn:
            found = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM analysis WHERE id = ?", [job_id]
            ).fetchone()
        if found is None:
            return None
        row = dict(zip(COLUMNS, found, strict=True))
        row["status"] = Status(row["status"])
        for name in sqlite3_backend.TIMESTAMPS:
            row[name] = sqlite3_backend.from_db(row[name])
        return row

    def force(self, job_id: Any, **values: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in values)
        params = [sqlite3_backend.to_db(v) for v in values.values()]
        with self.connect() as conn, conn:
            conn.execute(f"UPDATE analysis SET {sets} WHERE id = ?", [*params, job_id])

    def delete(self, job_id: Any) -> None:
        with self.connect() as conn, conn:
            conn.execute("DELETE FROM analysis WHERE id = ?", [job_id])

    @contextmanager
    def transaction(self) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
        with sqlite3_backend.transaction(self.path) as conn:

            def write(job_id: Any, value: str) -> None:
                conn.execute(
                    "INSERT INTO analysis_result (analysis_id, value) VALUES (?, ?)",
                    [job_id, value],
                )

            yield conn, write

    def results(self, job_id: Any) -> list[str]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT value FROM analysis_result WHERE analysis_id = ?", [job_id]
            ).fetchall()
        return [r[0] for r in rows]

    def add_worker(
        self, worker: str, heartbeat_at: dt.datetime, expires_at: dt.datetime | None = None
    ) -> None:
        stamp = sqlite3_backend.to_db(heartbeat_at)
        with self.connect() as conn, conn:
            conn.execute(
                f"INSERT INTO {WORKER_TABLE} (id, started_at, heartbeat_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                [worker, stamp, stamp, sqlite3_backend.to_db(expires_at)],
            )

    def expiry(self, worker: str) -> dt.datetime | None:
        with self.connect() as conn:
            (found,) = conn.execute(
                f"SELECT expires_at FROM {WORKER_TABLE} WHERE id = ?", [worker]
            ).fetchone()
        return sqlite3_backend.from_db(found)

    def heartbeat(self, worker: str) -> dt.datetime | None:
        with self.connect() as conn:
            found = conn.execute(
                f"SELECT heartbeat_at FROM {WORKER_TABLE} WHERE id = ?", [worker]
            ).fetchone()
        return None if found is None else sqlite3_backend.from_db(found[0])

    def seam(self) -> Any:
        return sqlite3_backend.Sqlite3Backend(self.path)

    def age_worker(self, worker: str, seconds: float) -> None:
        with self.connect() as conn, conn:
            info = conn.execute(f"PRAGMA table_info({WORKER_TABLE})").fetchall()
            stamps = [row[1] for row in info if row[1] != "id"]
            found = conn.execute(
                f"SELECT {', '.join(stamps)} FROM {WORKER_TABLE} WHERE id = ?", [worker]
            ).fetchone()
            for name, value in zip(stamps, found, strict=True):
                if value is not None:
                    older = sqlite3_backend.from_db(value) - dt.timedelta(seconds=seconds)
                    conn.execute(
                        f"UPDATE {WORKER_TABLE} SET {name} = ? WHERE id = ?",
                        [sqlite3_backend.to_db(older), worker],
                    )

    def clear(self) -> None:
        with self.connect() as conn, conn:
            conn.execute("DELETE FROM analysis_result")
            conn.execute("DELETE FROM analysis")
            conn.execute(f"DELETE FROM {WORKER_TABLE} WHERE id LIKE ?", [f"{OTHER}%"])


@pytest.fixture(scope="session")
def sqlite3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite file of the sqlite3 backend, its tables made."""
    path = tmp_path_factory.mktemp("sqlite3_backend") / "jobs.sqlite3"
    sqlite3_backend.create_tables(path)
    return path


@pytest.fixture(scope="session")
def event_loop_thread(sqlalchemy_engines: dict[str, Any]) -> Iterator[asyncio_backend.LoopThread]:
    """The loop `AsyncJobs` runs on, in a thread; its async engines are disposed on it
    (before the synchronous ones, which `sqlalchemy_engines` disposes)."""
    loop = asyncio_backend.LoopThread()
    yield loop
    for key in [k for k in sqlalchemy_engines if k.startswith("async:")]:
        loop.call(sqlalchemy_engines.pop(key).dispose())
    loop.close()


@pytest.fixture(params=CASES)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """One backend on one database; its rows are gone after the test."""
    kind, name = request.param
    check_reachable(name)
    b: Backend
    if kind == "sqlalchemy":
        b = SQLAlchemyBackend(name, request.getfixturevalue("sqlalchemy_engines"))
    elif kind == "sqlite3":
        b = Sqlite3Backend(request.getfixturevalue("sqlite3_path"))
    elif kind.startswith("asyncio"):
        driver = "psycopg" if kind == "asyncio-psycopg" else name
        b = AsyncioBackend(
            name,
            driver,
            request.getfixturevalue("sqlalchemy_engines"),
            request.getfixturevalue("event_loop_thread"),
        )
    else:
        b = DjangoBackend(name)
    try:
        yield b
    finally:
        # Django's transactional test case empties the Django tables itself (the worker
        # table included).
        b.clear()


# -- helpers -------------------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def assert_between(value: dt.datetime | None, start: dt.datetime, end: dt.datetime) -> None:
    assert value is not None
    assert value.tzinfo is not None, f"{value!r} is not timezone-aware"
    assert start - SLACK <= value <= end + SLACK, (start, value, end)


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a ``with`` block's ``__exit__`` would receive it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


class Worker:
    """One job and the worker side of it, driven step by step in this thread.

    ``enter()``/``leave()`` are what ``with jobs.run(id) as cp:`` calls; doing them by
    hand lets a test stop between them.
    """

    def __init__(self, b: Backend, jobs: Jobs) -> None:
        self.b = b
        self.jobs = jobs
        self.id = b.add()
        self.run: Any = None
        self.cp: Any = None

    def enter(self) -> Any:
        run = self.jobs.run(self.id)
        self.cp = run.__enter__()
        self.run = run
        return self.cp

    def leave(self, exc: BaseException | None = None) -> bool:
        run, self.run = self.run, None
        if exc is None:
            return bool(run.__exit__(None, None, None))
        exc = raised(exc)
        return bool(run.__exit__(type(exc), exc, exc.__traceback__))

    def close(self) -> None:
        if self.run is not None:
            self.leave()


@pytest.fixture
def worker(backend: Backend) -> Iterator[Worker]:
    w = Worker(backend, backend.jobs())
    try:
        yield w
    finally:
        w.close()


def arrange_at_rest(w: Worker, src: Status) -> None:
    """Bring the job to ``src`` through the API; an in_progress job keeps its run open."""
    if src is Status.PENDING:
        return
    w.enter()
    if src is Status.CANCELLED:
        assert w.jobs.cancel(w.id, reason="arranged") is True
        assert w.leave() is False
    elif src is Status.COMPLETED:
        assert w.leave() is False
    elif src is Status.FAILED:
        assert w.leave(RuntimeError("arranged failure")) is False
    assert w.b.row(w.id)["status"] is src


def arrange_with_open_run(w: Worker, src: Status) -> None:
    """Enter ``run()``, then bring the row to ``src`` while the worker is still inside.

    No operation moves a running job to pending or failed: those are forced, as a
    misbehaving actor on the table would.
    """
    w.enter()
    if src is Status.CANCELLED:
        assert w.jobs.cancel(w.id, reason="arranged") is True
    elif src is Status.COMPLETED:
        with w.b.transaction() as (using, _):
            w.cp.complete(using)
    elif src is not Status.IN_PROGRESS:
        w.b.force(w.id, status=src)
    assert w.b.row(w.id)["status"] is src


# -- the transition table ------------------------------------------------------------------

OPERATIONS = (Status.IN_PROGRESS, Status.COMPLETED, Status.FAILED, Status.CANCELLED)


PAIRS = [
    pytest.param(src, dst, id=f"{src.value}->{dst.value}") for src in Status for dst in OPERATIONS
]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_transition(backend, worker, src, dst):
    """Each (state, operation) pair: an allowed one happens, any other changes nothing."""
    allowed = dst in TRANSITIONS[src]
    if dst is Status.IN_PROGRESS:
        check_enter(worker, src, allowed)
    elif dst is Status.CANCELLED:
        check_cancel(worker, src, allowed)
    else:
        check_leave(worker, src, dst, allowed)


def check_enter(w: Worker, src: Status, allowed: bool) -> None:
    arrange_at_rest(w, src)
    before = w.b.row(w.id)
    if allowed:
        t0 = now()
        cp = w.enter()
        t1 = now()
        assert cp.cancelled is False
        row = w.b.row(w.id)
        assert row["status"] is Status.IN_PROGRESS
        assert_between(row["started_at"], t0, t1)
        assert row["worker_id"] == worker_id()  # its heartbeat is this process's
        assert row["finished_at"] is None
        assert w.leave() is False
        return
    if src is Status.CANCELLED:
        # Not a transition: the with statement raises the cancel, the body never runs.
        with pytest.raises(Cancelled) as info:
            w.jobs.run(w.id).__enter__()
        assert (info.value.job_id, info.value.reason) == (w.id, "arranged")
    else:
        with pytest.raises(InvalidTransition) as info:
            w.jobs.run(w.id).__enter__()
        err = info.value
        assert (err.model, err.job_id, err.current, err.wanted) == (
            "Analysis",
            w.id,
            src.value,
            "in_progress",
        )
    assert w.b.row(w.id) == before


@pytest.mark.parametrize("src", list(Status), ids=[s.value for s in Status])
def test_retry_transition(backend, worker, src):
    """A retry the body asks for: in_progress → pending, the attempt count and the error
    kept; from any other state it changes nothing, and a cancelled job stays so."""
    w = worker
    allowed = Status.PENDING in TRANSITIONS[src]
    arrange_with_open_run(w, src)
    before = w.b.row(w.id)
    moved = w.jobs._retry(w.cp, "OSError: disk full")
    assert moved is allowed
    row = w.b.row(w.id)
    if not allowed:
        assert row == before
        # Stopped (no retry runs after a cancel), unless it completed through
        # cp.complete(): then the run is over, and nothing is retried either.
        assert w.cp.cancelled is (src is not Status.COMPLETED)
        return
    assert row["status"] is Status.PENDING
    assert row["error"] == "OSError: disk full"
    assert row["finished_at"] is None  # not stopped: the job runs again
    assert row["attempts"] == 1
    assert w.leave(RuntimeError("the queue's retry")) is False  # writes nothing
    assert w.b.row(w.id) == row
    assert w.jobs.cancel(w.id) is True  # between two attempts: the cancel wins
    with pytest.raises(Cancelled):
        w.jobs.run(w.id).__enter__()


def test_a_retry_runs_again_and_counts_its_attempts(backend, worker):
    w = worker
    w.enter()
    assert w.jobs._retry(w.cp, "OSError: disk full") is True
    w.leave(OSError("disk full"))
    w.enter()
    assert w.b.row(w.id)["attempts"] == 2
    assert w.b.row(w.id)["error"] == "OSError: disk full"  # the last retry's, until the end
    assert w.leave() is False
    row = w.b.row(w.id)
    assert (row["status"], row["attempts"]) == (Status.COMPLETED, 2)


def check_cancel(w: Worker, src: Status, allowed: bool) -> None:
    arrange_at_rest(w, src)
    before = w.b.row(w.id)
    t0 = now()
    result = w.jobs.cancel(w.id, reason="by the test")
    t1 = now()
    row = w.b.row(w.id)
    if not allowed:
        # Already cancelled: True, the first reason is kept. Completed/failed: False.
        assert result is (src is Status.CANCELLED)
        assert row == before
        return
    assert result is True
    assert row["status"] is Status.CANCELLED
    assert_between(row["cancel_requested_at"], t0, t1)
    assert row["cancel_reason"] == "by the test"
    if src is Status.PENDING:
        assert_between(row["finished_at"], t0, t1)  # nothing runs it: stopped now
        assert w.jobs.wait(w.id, timeout=5) is Status.CANCELLED
        return
    assert row["finished_at"] is None  # its worker has not stopped yet...
    assert (w.cp.cancelled, w.cp.reason) == (True, "by the test")  # ...but knows at once
    assert w.leave() is False
    after = w.b.row(w.id)
    assert after["status"] is Status.CANCELLED  # never completed after a cancel
    assert after["finished_at"] >= row["cancel_requested_at"]


def check_leave(w: Worker, src: Status, dst: Status, allowed: bool) -> None:
    arrange_with_open_run(w, src)
    before = w.b.row(w.id)
    t0 = now()
    swallowed = w.leave() if dst is Status.COMPLETED else w.leave(RuntimeError("it broke"))
    t1 = now()
    assert swallowed is False
    row = w.b.row(w.id)
    if allowed:
        assert row["status"] is dst
        assert_between(row["finished_at"], t0, t1)
        assert row["error"] == (None if dst is Status.COMPLETED else "RuntimeError: it broke")
        return
    # Refused: only finished_at may change (this worker has really stopped), and with it
    # cancel_observed_at when the worker saw a cancel on its way out.
    assert row["status"] is src
    stamps = ("finished_at", "cancel_observed_at")
    assert {k: v for k, v in row.items() if k not in stamps} == {
        k: v for k, v in before.items() if k not in stamps
    }
    assert row["finished_at"] is not None
    if before["finished_at"] is None and src is Status.CANCELLED:
        assert_between(row["cancel_observed_at"], t0, t1)
    else:
        assert row["cancel_observed_at"] == before["cancel_observed_at"]


# -- run / cancel / wait -------------------------------------------------------------------


def test_run_completes_and_wait_returns_the_final_status(backend):
    jobs = backend.jobs()
    job = backend.add()
    with jobs.run(job) as cp:
        assert jobs.status(job) is Status.IN_PROGRESS
        assert [a.job_id for a in jobs.active()] == [job]
        cp()
    assert jobs.active() == ()
    assert jobs.status(job) is Status.COMPLETED
    assert jobs.wait(job, timeout=5) is Status.COMPLETED


def test_failure_is_recorded_and_reraised(backend):
    jobs = backend.jobs()
    job = backend.add()
    error = ValueError("bad file: x.wav")
    with pytest.raises(ValueError) as info, jobs.run(job):
        raise error
    assert info.value is error
    row = backend.row(job)
    assert (row["status"], row["error"]) == (Status.FAILED, "ValueError: bad file: x.wav")
    assert jobs.wait(job, timeout=5) is Status.FAILED


def test_worker_raising_cancelled_marks_the_job_cancelled(backend):
    jobs = backend.jobs()
    job = backend.add()
    with jobs.run(job):
        raise Cancelled(job, "worker gave up")
    row = backend.row(job)
    assert (row["status"], row["cancel_reason"]) == (Status.CANCELLED, "worker gave up")
    assert row["finished_at"] is not None


def test_cancel_seen_by_poll(backend):
    """A cancel made behind this process's back reaches ``cp()`` at the next poll."""
    clock = FakeClock()
    jobs = backend.jobs(interval=10, clock=clock)
    job = backend.add(user_id="bob")
    with jobs.run(job) as cp:
        backend.force(job, status=Status.CANCELLED, cancel_reason="elsewhere")
        cp()  # no poll due yet: the stale state is kept
        assert cp.cancelled is False
        clock.advance(10)
        with pytest.raises(Cancelled) as info:
            cp()
        assert (info.value.job_id, info.value.reason) == (job, "elsewhere")
    row = backend.row(job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


def test_deleted_row_stops_the_worker(backend):
    clock = FakeClock()
    jobs = backend.jobs(interval=1, clock=clock)
    job = backend.add()
    with jobs.run(job) as cp:
        backend.delete(job)
        clock.advance(1)
        with pytest.raises(Cancelled) as info:
            cp()
        assert info.value.reason == "deleted"
    assert backend.row(job) is None


def test_wait_times_out_while_the_worker_runs(backend):
    jobs = backend.jobs()
    job = backend.add()
    with jobs.run(job), pytest.raises(TimeoutError):
        jobs.wait(job, timeout=0)
    assert jobs.wait(job, timeout=5) is Status.COMPLETED
    with pytest.raises(JobNotFound):
        jobs.wait(backend.add() + 1000, timeout=1)


def test_results_commit_with_the_completion(backend):
    jobs = backend.jobs()
    job = backend.add()
    with jobs.run(job) as cp, backend.transaction() as (using, write):
        write(job, "r1")
        write(job, "r2")
        cp.complete(using)
    assert sorted(backend.results(job)) == ["r1", "r2"]
    assert backend.row(job)["status"] is Status.COMPLETED


def test_results_of_a_cancelled_job_roll_back(backend):
    jobs = backend.jobs()
    job = backend.add()
    with jobs.run(job) as cp:
        jobs.cancel(job, reason="changed my mind")
        with pytest.raises(Cancelled):
            complete_with_a_result(backend, cp, job)
    assert backend.results(job) == []
    assert backend.row(job)["status"] is Status.CANCELLED


def complete_with_a_result(backend: Backend, cp: Any, job: Any) -> None:
    with backend.transaction() as (using, write):
        write(job, "r1")
        cp.complete(using)


def test_cancel_from_another_thread(backend):
    jobs = backend.jobs()
    job = backend.add()
    entered, seen = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    items = []

    def work() -> None:
        try:
            with jobs.run(job) as cp:
                cp.on_cancel(seen.set)
                entered.set()
                while True:
                    cp()
                    items.append(1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            entered.set()
            _close_thread_connections(backend)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert entered.wait(JOIN_TIMEOUT)
    assert jobs.cancel(job, reason="from the main thread") is True
    assert seen.wait(JOIN_TIMEOUT)
    assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert errors == []
    row = backend.row(job)
    assert (row["status"], row["cancel_reason"]) == (Status.CANCELLED, "from the main thread")


def _close_thread_connections(backend: Backend) -> None:
    if isinstance(backend, DjangoBackend):
        from django.db import connections

        connections.close_all()


# -- filters and bad input -----------------------------------------------------------------


def test_where_filters_guard_ownership(backend):
    jobs = backend.jobs()
    job = backend.add(user_id="alice")
    before = backend.row(job)
    with pytest.raises(JobNotFound) as info:
        jobs.cancel(job, where={"user_id": "mallory"})
    assert info.value.where == {"user_id": "mallory"}
    with pytest.raises(JobNotFound):
        jobs.run(job, where={"user_id": "mallory"}).__enter__()
    assert backend.row(job) == before
    with jobs.run(job, where={"user_id": "alice"}):
        assert jobs.cancel(job, where={"user_id": "alice"}) is True
    assert backend.row(job)["status"] is Status.CANCELLED


def test_cancel_where_cancels_only_matching_unfinished_jobs(backend):
    jobs = backend.jobs()
    mine = [backend.add(session_id="s1") for _ in range(3)]
    other = backend.add(session_id="s2")
    done = backend.add(session_id="s1")
    with jobs.run(done):
        pass
    with jobs.run(mine[0]) as cp:
        assert jobs.cancel_where(session_id="s1", user_id="alice") == 3
        assert cp.cancelled is True  # a local worker is told at once
    assert [backend.row(j)["status"] for j in mine] == [Status.CANCELLED] * 3
    assert backend.row(other)["status"] is Status.PENDING
    assert backend.row(done)["status"] is Status.COMPLETED
    with pytest.raises(ValueError, match="at least one"):
        jobs.cancel_where()


def test_bad_input_changes_nothing(backend):
    jobs = backend.jobs()
    job = backend.add()
    before = backend.row(job)
    missing = job + 1000
    with pytest.raises(ValueError, match="nope"):
        jobs.cancel(job, where={"nope": 1})
    with pytest.raises(ValueError, match="nope"):
        jobs.cancel_where(nope=1)
    with pytest.raises(TypeError, match="ids are int"):
        jobs.cancel(str(job))
    with pytest.raises(TypeError):
        jobs.status(None)
    for call in (jobs.status, jobs.cancel, lambda j: jobs.run(j).__enter__()):
        with pytest.raises(JobNotFound) as info:
            call(missing)
        assert info.value.job_id == missing
        assert "not found" in str(info.value)
    with pytest.raises(ValueError):
        backend.jobs(interval=0)
    assert backend.row(job) == before


# -- liveness ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_running_job_beats_its_worker_row_on_the_database_clock(backend):
    jobs = backend.jobs(heartbeat=0.05)
    job = backend.add()
    # Longer than the period since any earlier beat: the job beats before it starts.
    time.sleep(0.1)
    t0 = now()
    with jobs.run(job):
        first = backend.heartbeat(worker_id())  # beaten before the job started
        assert_between(first, t0, now())
        assert backend.row(job)["worker_id"] == worker_id()
        wait_until(lambda: backend.heartbeat(worker_id()) > first, JOIN_TIMEOUT, "a beat")
        assert jobs.stats().heartbeats >= 2
    assert_between(backend.heartbeat(worker_id()), t0, now())


def test_reap_stops_the_jobs_of_dead_workers_only(backend):
    jobs = backend.jobs()
    fresh, dead, stale = f"{OTHER}1:alive", f"{OTHER}2:gone", f"{OTHER}3:stale"
    started = now() - dt.timedelta(hours=1)
    backend.add_worker(fresh, now())
    backend.add_worker(stale, started)
    alive = backend.add(status=Status.IN_PROGRESS, worker_id=fresh, started_at=started)
    lost = backend.add(status=Status.IN_PROGRESS, worker_id=dead, started_at=started)
    cancelled = backend.add(
        status=Status.CANCELLED, worker_id=stale, started_at=started, cancel_reason="asked"
    )
    legacy = backend.add(status=Status.IN_PROGRESS, started_at=started)  # no worker_id
    pending = backend.add()
    before = {j: backend.row(j) for j in (alive, pending)}
    t0 = now()
    assert jobs.reap(60) == 3
    t1 = now()
    for job in (lost, legacy):
        row = backend.row(job)
        assert (row["status"], row["error"]) == (Status.FAILED, WORKER_LOST)
        assert_between(row["finished_at"], t0, t1)
    row = backend.row(cancelled)
    assert (row["status"], row["cancel_reason"]) == (Status.CANCELLED, "asked")
    assert_between(row["finished_at"], t0, t1)
    assert jobs.wait(cancelled, timeout=5) is Status.CANCELLED
    assert {j: backend.row(j) for j in (alive, pending)} == before
    # The stale worker row named no unfinished job any more: forgotten. The fresh one stays.
    assert backend.heartbeat(stale) is None
    assert backend.heartbeat(fresh) is not None
    assert jobs.reap(60) == 0
    with pytest.raises(ValueError):
        jobs.reap(0)


@pytest.mark.parametrize("watch", [False, True], ids=["threadless", "watched"])
def test_live_jobs_are_never_reaped(backend, watch):
    """Three jobs run for ten heartbeat periods while reap(3 periods) runs all along,
    as an operator's cron job would: not one is touched, in either mode, on any
    backend (only the process's one worker row beats, not the jobs)."""
    period = 0.3  # generous: a beat delayed by a loaded machine must not look dead
    jobs = backend.jobs(heartbeat=period, watch=watch)
    ids = [backend.add() for _ in range(3)]
    # The fixture emptied the worker table after the previous test, whose last beat may
    # be less than a period old: then the first job would not beat as it starts, and
    # its worker row would be missing (dead to reap) until the next beat. Let a period
    # pass so that the first job beats the row back before it runs.
    time.sleep(period * 1.5)
    running = threading.Barrier(len(ids) + 1)
    done = threading.Event()
    errors: list[BaseException] = []

    def work(job: Any) -> None:
        try:
            with jobs.run(job) as cp:
                running.wait(JOIN_TIMEOUT)
                while not done.wait(0.01):
                    cp()
        except BaseException as exc:
            errors.append(exc)
        finally:
            _close_thread_connections(backend)

    threads = [threading.Thread(target=work, args=(job,), daemon=True) for job in ids]
    for t in threads:
        t.start()
    running.wait(JOIN_TIMEOUT)
    reaped = rounds = 0
    deadline = time.monotonic() + 10 * period
    while time.monotonic() < deadline:  # the span under test: reaps race the heartbeat
        reaped += jobs.reap(3 * period)
        rounds += 1
        # As often as a cron job could, but not in a tight loop: on SQLite a writer that
        # never lets go of the database lock starves the heartbeat's write.
        time.sleep(period / 10)
    done.set()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
    assert errors == []
    assert rounds > 10
    assert reaped == 0
    for job in ids:
        row = backend.row(job)
        assert (row["status"], row["error"], row["worker_id"]) == (
            Status.COMPLETED,
            None,
            worker_id(),
        )


class OwnHeartbeat:
    """A backend that hands every call to ``inner`` but has a worker key of its own, and
    writes only the first ``forward`` beats.

    ``Jobs`` on it get a heartbeat of their own in this process, which beats as their
    first job starts: the process's shared one may have beaten moments ago for another
    test, and then a joining job would not beat at all. The worker row is the same
    (``worker_id()``). Every beat's arguments are noted in ``beats``; those after the
    first ``forward`` are not written, as if the process had stalled, so that a test
    moves the database's clock by ageing the row and no late beat undoes it.
    """

    def __init__(self, inner: Any, forward: int = 1) -> None:
        self._inner = inner
        self._forward = forward
        self.worker_key = ("contract-own-heartbeat", id(self))
        self.beats: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def beat_worker(self, *args: Any) -> None:
        self.beats.append(args)
        if len(self.beats) <= self._forward:
            self._inner.beat_worker(*args)


def test_reap_shorter_than_a_live_workers_period_fails_none_of_its_jobs(backend):
    """A worker beating every 6 s, a reaper run with stale_after=3: the job lives until
    its worker has missed three beats (18 s on the database's clock), and then goes."""
    seam = OwnHeartbeat(backend.seam())
    jobs = Jobs.from_backend(seam, heartbeat=6, interval=INTERVAL)
    job = backend.add()
    with jobs.run(job):
        assert seam.beats[0] == (worker_id(), 6)  # as the job started, with its period
        assert jobs.reap(3) == 0
        backend.age_worker(worker_id(), 4)  # no beat for 4 s: less than one period
        assert jobs.reap(3) == 0
        backend.age_worker(worker_id(), 13)  # 17 s: still within three periods
        assert jobs.reap(3) == 0
        assert backend.row(job)["status"] is Status.IN_PROGRESS
        backend.age_worker(worker_id(), 2)  # 19 s: three beats missed
        assert jobs.reap(3) == 1
    row = backend.row(job)
    assert (row["status"], row["error"]) == (Status.FAILED, WORKER_LOST)


def test_a_beat_writes_its_expiry_missed_beats_periods_ahead(backend):
    """``beat_worker(id, period)`` stamps ``heartbeat_at`` and ``expires_at`` =
    ``heartbeat_at`` + MISSED_BEATS periods, both on the database's clock, when it
    inserts the row and when it updates it."""
    seam = backend.seam()
    worker = f"{OTHER}beats"
    for period in (6, 0.25):
        t0 = now()
        seam.beat_worker(worker, period)
        t1 = now()
        beat = backend.heartbeat(worker)
        assert_between(beat, t0, t1)
        assert beat is not None
        lifetime = backend.expiry(worker) - beat
        # SQLite's clock keeps milliseconds: the expiry may lose a part of one.
        exact = dt.timedelta(seconds=MISSED_BEATS * period)
        assert exact - dt.timedelta(milliseconds=1) <= lifetime <= exact, (period, lifetime)


def test_reap_judges_each_worker_by_its_own_period_with_stale_after_as_a_floor(backend):
    """A worker is dead when its last beat is older than max(stale_after, MISSED_BEATS
    periods of its own); a row without expires_at (an earlier dbcancel's) by stale_after
    alone. Live workers' rows stay, even when no unfinished job names them."""
    jobs = backend.jobs()
    t = now()

    def ago(seconds: float) -> dt.datetime:
        return t - dt.timedelta(seconds=seconds)

    # (last beat, expiry) of each worker, for reap(stale_after=3); periods in the names.
    workers = {
        "6s, beat 4 s ago": (ago(4), ago(4 - 18)),
        "6s, beat 15 s ago": (ago(15), ago(15 - 18)),
        "6s, beat 21 s ago": (ago(21), ago(21 - 18)),
        "0.1s, beat 1 s ago": (ago(1), ago(1 - 0.3)),  # stale_after is the floor
        "0.1s, beat 5 s ago": (ago(5), ago(5 - 0.3)),
        "earlier, beat 1 s ago": (ago(1), None),
        "earlier, beat 5 s ago": (ago(5), None),
    }
    alive = {"6s, beat 4 s ago", "6s, beat 15 s ago", "0.1s, beat 1 s ago", "earlier, beat 1 s ago"}
    ids: dict[str, Any] = {}
    for name, (beat, expires) in workers.items():
        worker = f"{OTHER}{name}"
        backend.add_worker(worker, beat, expires)
        ids[name] = backend.add(status=Status.IN_PROGRESS, worker_id=worker, started_at=ago(60))
    idle = {name: f"{OTHER}idle {name}" for name in ("6s, beat 4 s ago", "6s, beat 21 s ago")}
    for name, worker in idle.items():
        backend.add_worker(worker, *workers[name])

    assert jobs.reap(3) == len(workers) - len(alive)
    for name, job in ids.items():
        want = Status.IN_PROGRESS if name in alive else Status.FAILED
        assert backend.row(job)["status"] is want, name
    # Worker rows go by the same rule, once no unfinished job names them.
    assert backend.heartbeat(idle["6s, beat 4 s ago"]) is not None
    assert backend.heartbeat(idle["6s, beat 21 s ago"]) is None
    for name in workers:
        assert (backend.heartbeat(f"{OTHER}{name}") is None) is (name not in alive), name
    assert jobs.reap(3) == 0
