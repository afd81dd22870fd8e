"""Tenants: tables of the same name in other schemas (PostgreSQL) or other databases
(MariaDB) of one server are other tables, whichever way an engine reaches them.

Each tenant here is a schema (a database on MariaDB) of its own, named after the
process, with the suite's tables in it; the tests run job 7 of several tenants side by
side and check that a cancel, a notification, a heartbeat or a reap of one tenant never
touches another's. An engine reaches a tenant in one of three ways (``WAYS``):
``engine.execution_options(schema_translate_map={None: tenant})`` (all tenants then
share one engine's pool, as SQLAlchemy's recipe has it), ``search_path`` in
``connect_args``, and ``options=-csearch_path=...`` in the URL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, delete, event, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dbcancel import DbcancelError, Jobs, Status
from dbcancel._liveness import worker_id
from dbcancel.models import worker_table
from tests.conftest import SERVERS, _unreachable
from tests.models import Analysis, Base

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__
WORKERS = worker_table(Base.metadata)
WAYS = ("translate_map", "connect_args", "url_options")
_IDS = itertools.count(1000)
NO_BEAT = 600.0
"""A heartbeat period no test lives through: only a job's start beats the worker row."""


def tenant_name() -> str:
    return f"t{os.getpid()}_{uuid.uuid4().hex[:6]}"


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # polling state that nothing signals


@dataclass
class Tenants:
    """Tenant schemas (databases on MariaDB) on one server, each with the suite's tables."""

    server: str
    names: list[str]
    base: Engine
    """One engine of the server: the translate-map engines of every tenant share it."""
    engines: dict[tuple[int, str], Engine] = field(default_factory=dict)
    own: list[Engine] = field(default_factory=list)
    job: int = field(default_factory=lambda: next(_IDS))
    """The id the test's job has in every tenant: a new one per test, as a notification
    of an earlier test's cancel may still be on its way to this process's watcher."""

    def engine(self, tenant: int, way: str = "translate_map") -> Engine:
        """An engine whose unqualified tables are tenant ``tenant``'s, reached ``way``."""
        key = (tenant, way)
        if key not in self.engines:
            name = self.names[tenant]
            if way == "translate_map":
                engine = self.base.execution_options(schema_translate_map={None: name})
            elif way == "connect_args":
                engine = create_engine(
                    SERVERS[self.server], connect_args={"options": f"-csearch_path={name}"}
                )
                self.own.append(engine)
            else:
                url = make_url(SERVERS[self.server]).update_query_dict(
                    {"options": f"-csearch_path={name}"}
                )
                engine = create_engine(url)
                self.own.append(engine)
            self.engines[key] = engine
        return self.engines[key]

    def jobs(self, tenant: int, way: str = "translate_map", **options: Any) -> Jobs:
        options.setdefault("interval", 30.0)
        return Jobs(self.engine(tenant, way), Analysis, **options)

    def add(self, tenant: int, job_id: int | None = None, **values: Any) -> int:
        job_id = self.job if job_id is None else job_id
        with self.engine(tenant).begin() as conn:
            conn.execute(insert(TABLE).values(id=job_id, **values))
        return job_id

    def row(self, tenant: int, job_id: int | None = None) -> Any:
        job_id = self.job if job_id is None else job_id
        with self.engine(tenant).connect() as conn:
            return conn.execute(select(TABLE).where(TABLE.c.id == job_id)).one()

    def workers(self, tenant: int) -> dict[str, Any]:
        """The worker table of ``tenant``: heartbeat by worker id."""
        with self.engine(tenant).connect() as conn:
            return dict(conn.execute(select(WORKERS.c.id, WORKERS.c.heartbeat_at)).all())

    def empty(self) -> None:
        """Delete the jobs; worker rows stay, as this process's heartbeats expect."""
        for tenant in range(len(self.names)):
            with self.engine(tenant).begin() as conn:
                conn.execute(delete(TABLE))


def tenants(server: str, count: int) -> Iterator[Tenants]:
    names = [tenant_name() for _ in range(count)]
    kind = "SCHEMA" if server == "postgresql" else "DATABASE"
    admin = create_engine(SERVERS[server], isolation_level="AUTOCOMMIT")
    created: list[str] = []
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f"CREATE {kind} {name}"))
                created.append(name)
    except Exception as err:  # any driver error means unreachable
        admin.dispose()
        _unreachable(server, err)
    base = create_engine(SERVERS[server], pool_size=10, max_overflow=20)
    t = Tenants(server, names, base)
    try:
        for tenant in range(count):
            Base.metadata.create_all(t.engine(tenant))
        yield t
    finally:
        for engine in [base, *t.own]:
            engine.dispose()
        with admin.connect() as conn:
            for name in created:
                conn.execute(text(f"DROP {kind} {name}{' CASCADE' if kind == 'SCHEMA' else ''}"))
        admin.dispose()


@pytest.fixture(scope="module")
def pg_tenants() -> Iterator[Tenants]:
    yield from tenants("postgresql", 3)


@pytest.fixture
def pg(pg_tenants: Tenants) -> Iterator[Tenants]:
    """Three PostgreSQL tenants, emptied after each test."""
    pg_tenants.job = next(_IDS)
    yield pg_tenants
    pg_tenants.empty()


@pytest.fixture
def fresh_pg() -> Iterator[Tenants]:
    """Two PostgreSQL tenants of this test's own: worker tables this process has
    never beaten (its heartbeats beat a worker row again only once a period is over)."""
    yield from tenants("postgresql", 2)


@pytest.fixture
def maria() -> Iterator[Tenants]:
    """Two MariaDB databases on one server, of this test's own."""
    yield from tenants("mariadb", 2)


def mode_options(mode: str) -> dict[str, Any]:
    # Threadless with a 30 s interval: only this process's registry can flip a flag.
    # Watched, 30 s too: the registry, or a notification.
    return {"watch": mode == "watched", "heartbeat": NO_BEAT}


# -- PostgreSQL, in one process ---------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.parametrize("way", WAYS)
def test_each_tenant_has_its_own_keys_and_channel(pg, way):
    a, b = pg.jobs(0, way), pg.jobs(1, way)
    assert a._backend.key != b._backend.key
    assert a._backend.worker_key != b._backend.worker_key
    assert pg.names[0] in a._backend.key
    assert pg.names[1] in b._backend.key
    assert a._backend.channel == f"dbcancel:{pg.names[0]}.analysis"
    assert b._backend.channel == f"dbcancel:{pg.names[1]}.analysis"


@pytest.mark.postgresql
def test_every_way_to_one_tenant_gives_the_same_keys(pg):
    """The key is the table the server resolves, not how the engine was configured: a
    cancel through any engine of the tenant reaches its job running in this process."""
    by_way = [pg.jobs(0, way) for way in WAYS]
    assert len({j._backend.key for j in by_way}) == 1
    assert len({j._backend.worker_key for j in by_way}) == 1
    assert len({j._backend.channel for j in by_way}) == 1
    pg.add(0)
    runner, *others = by_way
    with runner.run(pg.job) as cp:
        assert others[-1].cancel(pg.job, reason="through the URL's search_path") is True
        assert cp.cancelled  # at once: the registry, not a poll
        assert cp.reason == "through the URL's search_path"


@pytest.mark.postgresql
@pytest.mark.parametrize("mode", ["threadless", "watched"])
@pytest.mark.parametrize("way", WAYS)
def test_a_cancel_in_one_tenant_never_stops_the_same_id_in_another(pg, way, mode):
    a = pg.jobs(0, way, **mode_options(mode))
    b = pg.jobs(1, way, **mode_options(mode))
    pg.add(0)
    pg.add(1)
    with a.run(pg.job) as cp_a, b.run(pg.job) as cp_b:
        assert a.cancel(pg.job, reason="tenant a") is True
        assert cp_a.cancelled
        assert cp_a.reason == "tenant a"
        if mode == "watched":
            wait_until(lambda: a.stats().listening and b.stats().listening, 10, "listeners")
            time.sleep(0.3)  # a notification on the wrong channel would arrive by now
        assert not cp_b.cancelled
        cp_b()
    assert pg.row(0).status is Status.CANCELLED
    row = pg.row(1)
    assert (row.status, row.cancel_reason) == (Status.COMPLETED, None)
    assert b.wait(pg.job, timeout=5) is Status.COMPLETED
    assert a.wait(pg.job, timeout=5) is Status.CANCELLED


@pytest.mark.postgresql
@pytest.mark.parametrize("way", WAYS)
def test_each_tenant_beats_its_own_worker_table_and_reaps_its_own_jobs(fresh_pg, way):
    pg = fresh_pg
    a = pg.jobs(0, way, heartbeat=NO_BEAT)
    b = pg.jobs(1, way, heartbeat=NO_BEAT)
    pg.add(0)
    pg.add(1)
    with a.run(pg.job), b.run(pg.job):
        # Each job's start beat its own tenant's worker table.
        assert worker_id() in pg.workers(0)
        assert worker_id() in pg.workers(1)
        # Both live: neither tenant's reap fails either job.
        assert a.reap(3600) == 0
        assert b.reap(3600) == 0
        assert pg.row(0).status is Status.IN_PROGRESS
        assert pg.row(1).status is Status.IN_PROGRESS
    assert pg.row(0).status is Status.COMPLETED
    assert pg.row(1).status is Status.COMPLETED


@pytest.mark.postgresql
@pytest.mark.parametrize("way", WAYS)
def test_a_beat_and_a_reap_in_one_tenant_touch_only_its_tables(fresh_pg, way):
    pg = fresh_pg
    a = pg.jobs(0, way, heartbeat=NO_BEAT)
    b = pg.jobs(1, way, heartbeat=NO_BEAT)
    # Tenant b: a job of a dead worker, and a stale worker row no job names.
    pg.add(1, status="in_progress", worker_id="dead-host:1:x")
    with pg.engine(1).begin() as conn:
        conn.execute(
            insert(WORKERS).values(
                id="stale-host:2:y",
                started_at=text("now() - interval '2 hours'"),
                heartbeat_at=text("now() - interval '2 hours'"),
            )
        )
    pg.add(0)
    with a.run(pg.job):
        assert a.reap(60) == 0  # tenant a's job is live; b's dead one is not a's
        assert worker_id() in pg.workers(0)
        assert set(pg.workers(1)) == {"stale-host:2:y"}
        assert pg.row(1).status is Status.IN_PROGRESS
        assert b.reap(60) == 1
        row = pg.row(1)
        assert (row.status, row.error) == (Status.FAILED, "worker lost")
        assert pg.workers(1) == {}  # b's stale worker row went with b's reap
        assert worker_id() in pg.workers(0)  # a's worker row stayed
        assert pg.row(0).status is Status.IN_PROGRESS
    assert pg.row(0).status is Status.COMPLETED


# -- PostgreSQL, across processes ------------------------------------------------------

CHILD = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from dbcancel import Jobs
from tests.models import Analysis

url, way, schema, job = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if way == "translate_map":
    engine = create_engine(url).execution_options(schema_translate_map={None: schema})
else:
    engine = create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
assert Jobs(engine, Analysis).cancel(job, reason="from the child") is True
"""


@pytest.mark.postgresql
@pytest.mark.parametrize("way", ["translate_map", "connect_args"])
def test_a_cancel_from_another_process_reaches_only_its_tenants_watcher(pg, way):
    """Interval 30 s: within the bound, only a notification can deliver the cancel."""
    a = pg.jobs(0, way, watch=True, heartbeat=NO_BEAT)
    b = pg.jobs(1, way, watch=True, heartbeat=NO_BEAT)
    pg.add(0)
    pg.add(1)
    with a.run(pg.job) as cp_a, b.run(pg.job) as cp_b:
        wait_until(lambda: a.stats().listening and b.stats().listening, 10, "listeners")
        notified = a.stats().notifications
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, SERVERS["postgresql"], way, pg.names[0], str(pg.job)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: cp_a.cancelled, 10, "the notification to tenant a's watcher")
        assert cp_a.reason == "from the child"
        assert a.stats().notifications > notified
        time.sleep(0.3)  # had it come on b's channel too, it would be here by now
        assert not cp_b.cancelled
        cp_b()
    assert pg.row(0).status is Status.CANCELLED
    assert pg.row(1).status is Status.COMPLETED


# -- PostgreSQL: a search_path that changes under one engine -----------------------------


def start(jobs: Jobs, job: int) -> None:
    with jobs.run(job):
        pass


@pytest.mark.postgresql
def test_a_search_path_switched_per_checkout_is_refused(pg):
    """One engine whose checkout event points the search_path at the tenant of the
    moment: dbcancel cannot tell which tenant a call is for, and refuses rather than
    guess, in the statement it sends anyway (nothing is changed)."""
    current = {"schema": pg.names[0]}
    engine = create_engine(SERVERS["postgresql"])

    @event.listens_for(engine, "checkout")
    def point(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute(f"SET search_path TO {current['schema']}")
        dbapi_conn.commit()

    try:
        jobs = Jobs(engine, Analysis, interval=30.0, watch=False, heartbeat=NO_BEAT)
        pg.add(0)
        pg.add(1)
        assert jobs.status(pg.job) is Status.PENDING  # tenant a: the one it resolved
        current["schema"] = pg.names[1]
        a, b = pg.names[:2]
        pattern = rf"Analysis {pg.job}.*{a}.*{b}.*schema_translate_map"
        with pytest.raises(DbcancelError, match=pattern):
            jobs.cancel(pg.job)
        with pytest.raises(DbcancelError, match=pattern):
            jobs.status(pg.job)
        # A job's start may beat the worker row first: that statement refuses too.
        with pytest.raises(DbcancelError, match=rf"Analysis.*{a}.*{b}.*schema_translate_map"):
            start(jobs, pg.job)
        # A watcher's poll, and a reap.
        with pytest.raises(DbcancelError, match=rf"Analysis jobs {pg.job}.*{a}.*{b}"):
            jobs._backend.read_many([pg.job])
        with pytest.raises(DbcancelError, match=rf"{a}.*{b}"):
            jobs.reap(60)
        assert pg.row(1).status is Status.PENDING  # nothing was changed in tenant b
        current["schema"] = pg.names[0]
        assert jobs.cancel(pg.job) is True
        assert pg.row(0).status is Status.CANCELLED
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_a_sessionmaker_of_a_translated_engine_is_its_tenant(pg):
    jobs = Jobs(sessionmaker(pg.engine(1)), Analysis)
    assert jobs._backend.key == pg.jobs(1)._backend.key
    assert jobs._backend.key != pg.jobs(0)._backend.key


# -- the property -----------------------------------------------------------------------

CANCELS = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from([1, 2, 3]), st.sampled_from(WAYS)),
    max_size=6,
)


@pytest.mark.postgresql
@settings(max_examples=25, deadline=None)
@given(cancels=CANCELS)
def test_random_cancels_never_cross_tenants(pg_tenants, cancels):
    """Jobs 1-3 run in each of three tenants (through translate-map engines); random
    cancels through any way to a tenant stop exactly the jobs they name, and each
    tenant's reap fails none of the live jobs."""
    pg = pg_tenants
    runners = [pg.jobs(t, heartbeat=NO_BEAT, watch=False) for t in range(3)]
    ids = (1, 2, 3)
    try:
        for t in range(3):
            for job in ids:
                pg.add(t, job)
        with contextlib.ExitStack() as stack:
            cps = {
                (t, job): stack.enter_context(runners[t].run(job)) for t in range(3) for job in ids
            }
            for t, job, way in cancels:
                assert pg.jobs(t, way).cancel(job, reason=f"{t}:{job}") is True
            wanted = {(t, job) for t, job, _ in cancels}
            for (t, job), cp in cps.items():
                assert cp.cancelled is ((t, job) in wanted), (t, job)
                if cp.cancelled:
                    assert cp.reason == f"{t}:{job}"
            assert [r.reap(3600) for r in runners] == [0, 0, 0]
        for t in range(3):
            for job in ids:
                row = pg.row(t, job)
                if (t, job) in wanted:
                    assert (row.status, row.cancel_reason) == (Status.CANCELLED, f"{t}:{job}")
                else:
                    assert row.status is Status.COMPLETED
                assert row.finished_at is not None
    finally:
        pg.empty()


# -- MariaDB: databases are its schemas --------------------------------------------------


@pytest.mark.mariadb
def test_two_mariadb_databases_through_translate_maps_are_two_tables(maria):
    a = maria.jobs(0, heartbeat=NO_BEAT, watch=False)
    b = maria.jobs(1, heartbeat=NO_BEAT, watch=False)
    assert a._backend.key != b._backend.key
    assert maria.names[0] in a._backend.key
    assert maria.names[1] in b._backend.key
    assert a._backend.worker_key != b._backend.worker_key
    maria.add(0)
    maria.add(1)
    with a.run(maria.job) as cp_a, b.run(maria.job) as cp_b:
        assert worker_id() in maria.workers(0)
        assert worker_id() in maria.workers(1)
        assert a.cancel(maria.job, reason="database a") is True
        assert cp_a.cancelled
        assert not cp_b.cancelled
        assert a.reap(3600) == 0
        assert b.reap(3600) == 0
        cp_b()
    assert maria.row(0).status is Status.CANCELLED
    assert maria.row(1).status is Status.COMPLETED
    assert b.wait(maria.job, timeout=5) is Status.COMPLETED


# -- SQLite: the file ---------------------------------------------------------------------


@pytest.mark.sqlite
def test_sqlite_files_are_told_apart_by_their_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    engines = [
        create_engine("sqlite:///jobs.db"),
        create_engine(f"sqlite:///{tmp_path / 'jobs.db'}"),
        create_engine(f"sqlite:///{tmp_path / 'other' / '..' / 'jobs.db'}"),
        create_engine(f"sqlite:///{tmp_path / 'other' / 'jobs.db'}"),
    ]
    memories = [create_engine("sqlite://") for _ in range(2)]
    try:
        for engine in engines:
            Base.metadata.create_all(engine)
        keys = [Jobs(engine, Analysis)._backend.key for engine in engines]
        assert keys[0] == keys[1] == keys[2] != keys[3]
        assert str(tmp_path / "jobs.db") in keys[0]
        for engine in memories:
            Base.metadata.create_all(engine)  # the key is resolved where the tables are
        memory = [Jobs(engine, Analysis)._backend.key for engine in memories]
        assert memory[0] != memory[1]  # two in-memory databases
    finally:
        for engine in [*engines, *memories]:
            engine.dispose()


@pytest.mark.sqlite
def test_a_jobs_is_built_while_its_database_is_down_and_resolves_later(tmp_path):
    """Nothing is asked of the database when a Jobs is built: a down server must not
    break an application's start. The table is identified at first use."""
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'jobs.db'}")
    jobs = Jobs(engine, Analysis)  # the folder does not exist: every connect fails
    with pytest.raises(Exception, match="unable to open database file"):
        jobs.status(1)
    (tmp_path / "missing").mkdir()
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(TABLE).values(id=1))
    assert jobs.status(1) is Status.PENDING
    assert str(tmp_path / "missing" / "jobs.db") in jobs._backend.key
    engine.dispose()


@pytest.mark.postgresql
def test_a_postgresql_jobs_is_built_while_the_server_is_unreachable():
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    jobs = Jobs(engine, Analysis, watch=True)
    assert jobs.watch
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        jobs.cancel(1)
    engine.dispose()
