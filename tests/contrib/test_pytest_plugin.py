"""The pytest plugin, as a user's test suite meets it (run through pytester)."""

from __future__ import annotations

import pytest

from tests.conftest import Database

pytest_plugins = ["pytester"]

USER_TEST = """
import threading

import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import CancellableMixin, Jobs, Status


class Base(DeclarativeBase):
    pass


class Export(CancellableMixin, Base):
    __tablename__ = "export"
    id: Mapped[int] = mapped_column(primary_key=True)


def export_rows(jobs, job_id, rows, seen):
    with jobs.run(job_id) as cp:
        for row in rows:
            cp()
            seen.append(row)


def test_my_loop_stops_after_the_next_poll(dbcancel_engine, dbcancel_clock):
    Base.metadata.create_all(dbcancel_engine)
    jobs = Jobs(dbcancel_engine, Export, interval=1.0, clock=dbcancel_clock)
    with dbcancel_engine.begin() as conn:
        conn.execute(Export.__table__.insert().values(id=1))
    seen = []

    def rows():
        yield 1
        # another process cancels: only the row changes, no local flag
        with dbcancel_engine.begin() as conn:
            conn.execute(Export.__table__.update().values(status="cancelled"))
        yield 2                     # no poll due yet: the loop goes on
        dbcancel_clock.advance(1.0)
        yield 3                     # a poll is due: the loop stops before this row

    export_rows(jobs, 1, rows(), seen)
    assert seen == [1, 2]
    assert jobs.status(1) is Status.CANCELLED


@pytest.mark.dbcancel_clock(start=100.0)
def test_clock_marker(dbcancel_clock):
    assert dbcancel_clock() == 100.0
    assert dbcancel_clock.advance(0.5) == 100.5


def test_url_default_is_sqlite(dbcancel_url, tmp_path):
    assert dbcancel_url == f"sqlite:///{tmp_path / 'dbcancel.db'}"
"""


def test_users_suite_passes_with_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=3)


def test_url_option_and_environment(
    pytester: pytest.Pytester, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_url="""
        def test_url(dbcancel_url):
            print("URL=" + dbcancel_url)
        """
    )
    option_url = f"sqlite:///{tmp_path / 'from-option.db'}"
    result = pytester.runpytest_subprocess("-s", f"--dbcancel-url={option_url}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*URL={option_url}*"])

    env_url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("DBCANCEL_TEST_URL", env_url)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*URL={env_url}*"])


def test_marker_is_registered_with_its_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["*dbcancel_clock(start=0.0)*"])


def test_loading_the_plugin_imports_no_framework(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_modules="""
        import sys

        def test_nothing_heavy_loaded(dbcancel_clock):
            heavy = {"flask", "django", "websockets", "alembic", "psycopg", "pymysql"}
            assert sorted(heavy & {m.split(".")[0] for m in sys.modules}) == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "dbcancel", "-p", "no:django")
    result.assert_outcomes(passed=1)


@pytest.mark.postgresql
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_the_engine_is_disposed_once_the_runtime_gave_its_connections_back(
    pytester: pytest.Pytester, database: Database
) -> None:
    """A watched job on PostgreSQL leaves the runtime holding its LISTEN connection for
    a few seconds; the fixture's teardown has it given back before disposing the engine."""
    pytester.makepyfile(
        test_after=USER_TEST.split("\n\n\ndef test_")[0]
        + """

import time

kept = {}


def test_a_watched_job(dbcancel_engine):
    Base.metadata.create_all(dbcancel_engine)
    jobs = Jobs(dbcancel_engine, Export, interval=0.05, watch=True)
    with dbcancel_engine.begin() as conn:
        conn.execute(Export.__table__.insert().values(id=1))
    with jobs.run(1):
        deadline = time.monotonic() + 30
        while not jobs.stats().listening and time.monotonic() < deadline:
            time.sleep(0.01)
    kept["jobs"] = jobs
    assert jobs.stats().connections >= 1  # the listener stays open a while


def test_after_the_teardown():
    try:
        assert kept["jobs"].stats().connections == 0
    finally:
        Base.metadata.drop_all(kept["jobs"]._backend.engine)
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", f"--dbcancel-url={database.url}"
    )
    result.assert_outcomes(passed=2)
