"""One database fixture, parametrized over SQLite, PostgreSQL and MariaDB.

Each test session works in its own PostgreSQL schema and its own MariaDB database, named
after the process, so that concurrent runs on one machine do not see each other's rows.
The schema or database is part of the URL, so subprocesses started by tests reach it
with nothing but the URL. An unreachable server skips its tests locally and fails them
under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dbcancel import Jobs
from dbcancel.testing import close_watchers

from .models import Analysis, Base, Result

SERVERS = {
    "postgresql": os.environ.get(
        "DBCANCEL_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get("DBCANCEL_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Database:
    """A database the tests may use: its URL (with schema), an engine, a sessionmaker."""

    name: str
    url: str
    engine: Engine
    sessions: sessionmaker  # type: ignore[type-arg]

    def jobs(self, **kwargs: object) -> Jobs:
        kwargs.setdefault("interval", 0.05)
        return Jobs(self.engine, Analysis, **kwargs)  # type: ignore[arg-type]

    def add(self, **values: object) -> int:
        """Insert one job (pending unless ``status`` is given) and return its id."""
        with self.sessions.begin() as s:
            job = Analysis(**values)
            s.add(job)
            s.flush()
            return job.id

    def row(self, job_id: int) -> Analysis | None:
        with self.sessions() as s:
            return s.get(Analysis, job_id)


def _unreachable(name: str, err: Exception) -> None:
    message = f"{name} is not reachable: {err}"
    if IN_CI:
        pytest.fail(f"{message} (under CI=true every database must be up)")
    pytest.skip(message)


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # A generous busy timeout: threads of one test write to the same file.
        return create_engine(url, connect_args={"timeout": 30})
    # Few connections kept between tests, many allowed at once (the stress tests' threads):
    # four xdist workers share the server's connection limit (100 on PostgreSQL).
    return create_engine(url, pool_size=4, max_overflow=36, pool_pre_ping=True)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    with open_database(request.param, tmp_path_factory) as opened:
        yield opened


@contextmanager
def open_database(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A schema (PostgreSQL), a database (MariaDB) or a file (SQLite) of this process's
    own, its tables made; dropped on exit."""
    scope = f"dbcancel_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    cleanup = None
    if name == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "jobs.db"
        url = f"sqlite:///{path}"
    else:
        admin = create_engine(SERVERS[name], isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                if name == "postgresql":
                    conn.execute(text(f"CREATE SCHEMA {scope}"))
                else:
                    conn.execute(text(f"CREATE DATABASE {scope}"))
        except Exception as err:  # any driver error means unreachable
            admin.dispose()
            _unreachable(name, err)
        base = make_url(SERVERS[name])
        if name == "postgresql":
            url = base.update_query_dict({"options": f"-csearch_path={scope}"}).render_as_string(
                hide_password=False
            )
            drop = f"DROP SCHEMA {scope} CASCADE"
        else:
            url = base.set(database=scope).render_as_string(hide_password=False)
            drop = f"DROP DATABASE {scope}"

        def cleanup() -> None:
            with admin.connect() as conn:
                conn.execute(text(drop))
            admin.dispose()

    engine = _engine(url)
    Base.metadata.create_all(engine)
    try:
        yield Database(name, url, engine, sessionmaker(engine, expire_on_commit=False))
    finally:
        # The runtime may be in the middle of a poll or a beat of this database: a
        # connection it has checked out when the pool is disposed is orphaned, and its
        # ResourceWarning would fail whichever later test collects it. A test that left
        # a job running fails by itself; here it only must not hang the teardown.
        with contextlib.suppress(TimeoutError):
            close_watchers(10)
        engine.dispose()
        if cleanup is not None:
            cleanup()


@pytest.fixture
def db(database: Database) -> Iterator[Database]:
    """The session's database, emptied after each test."""
    yield database
    with database.engine.begin() as conn:
        conn.execute(delete(Result))
        conn.execute(delete(Analysis))
