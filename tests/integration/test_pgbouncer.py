"""dbcancel behind PgBouncer in transaction pooling mode.

Each module gets a PgBouncer of its own in front of a throwaway PostgreSQL (see
``servers.throwaway_pgbouncer``); nothing here touches a PgBouncer the system may run.
The engine goes through the pooler; ``listen_url`` gives the listener a direct
connection. Cancels come from another process, through the pooler.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from dbcancel import Cancelled, Jobs, Status
from dbcancel._runtime import runtime
from tests.models import Analysis, Base

from .servers import PgBouncer, throwaway_pgbouncer

# Throwaway servers and pooler processes: what they test does not change with the
# Python version, so they run on the first Python of test-all only.
pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NO_PREPARE = {"prepare_threshold": None}


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # poll-until: these states send no event
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    server = throwaway_pgbouncer()
    direct = create_engine(server.direct_url, poolclass=NullPool)
    try:
        Base.metadata.create_all(direct)
        yield server
    finally:
        direct.dispose()
        server.remove()


@pytest.fixture
def pooled(bouncer: PgBouncer) -> Iterator[Engine]:
    """An engine through the pooler, as the recipe in docs/fleets.md builds it. The
    runtime gives back the database's listener at the end (not after its grace), so
    that the next test starts a listener of its own."""
    engine = create_engine(bouncer.pooler_url, connect_args=NO_PREPARE)
    try:
        yield engine
    finally:
        assert runtime().close_idle(30) == []
        engine.dispose()


def add_job(bouncer: PgBouncer) -> int:
    direct = create_engine(bouncer.direct_url, poolclass=NullPool)
    try:
        with direct.begin() as conn:
            return int(conn.execute(insert(Analysis).returning(Analysis.id)).scalar_one())
    finally:
        direct.dispose()


def cancel_elsewhere(bouncer: PgBouncer, job: int) -> float:
    """Cancel `job` from another process, through the pooler; the time.time() at which
    the cancel had committed."""
    script = (
        "import time\n"
        "from sqlalchemy import create_engine\n"
        "from dbcancel import Jobs\n"
        "from tests.models import Analysis\n"
        f"engine = create_engine({bouncer.pooler_url!r}, connect_args={NO_PREPARE!r})\n"
        f"assert Jobs(engine, Analysis).cancel({job}, reason='from afar')\n"
        "print(time.time(), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


class Worker:
    """Run `job` in a thread, in a loop of checkpoints, until it is cancelled."""

    def __init__(self, jobs: Jobs, job: int) -> None:
        self.jobs, self.job = jobs, job
        self.started = threading.Event()
        self.cancelled_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.started.wait(30), "the job did not start"

    def _run(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:  # swallows the job's own Cancelled
                self.started.set()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        cp()
                    except Cancelled:
                        self.cancelled_at = time.time()
                        raise
                    time.sleep(0.005)
        except BaseException as err:
            self.error = err
        finally:
            self.started.set()

    def join(self) -> float:
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        assert self.cancelled_at is not None, "never cancelled"
        return self.cancelled_at


def test_the_pooler_is_in_transaction_mode_in_front_of_its_own_server(bouncer: PgBouncer) -> None:
    pooled = create_engine(bouncer.pooler_url, poolclass=NullPool, connect_args=NO_PREPARE)
    direct = create_engine(bouncer.direct_url, poolclass=NullPool)
    try:
        with pooled.connect() as conn:
            port = conn.execute(text("SELECT inet_server_port()")).scalar_one()
        assert port == bouncer.postgres.port
        with direct.connect() as conn:
            assert conn.execute(text("SELECT inet_server_port()")).scalar_one() == port
    finally:
        pooled.dispose()
        direct.dispose()
    with psycopg.connect(
        f"host=127.0.0.1 port={bouncer.port} user=postgres dbname=pgbouncer",
        autocommit=True,
        prepare_threshold=None,
    ) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "transaction"
    assert int(config["listen_port"]) == bouncer.port != 6432


def test_status_from_many_threads_through_the_pooler_with_prepared_statements_on(
    bouncer: PgBouncer,
) -> None:
    """The engine keeps psycopg's default (statements prepared after 5 runs): dbcancel's
    own statements must not be prepared, or transaction pooling breaks them."""
    engine = create_engine(bouncer.pooler_url, pool_size=6, max_overflow=0)
    jobs = Jobs(engine, Analysis)
    job = add_job(bouncer)
    errors: list[BaseException] = []
    answers: list[Status] = []
    lock = threading.Lock()

    def ask() -> None:
        for _ in range(60):
            try:
                status = jobs.status(job)
            except BaseException as err:
                with lock:
                    errors.append(err)
            else:
                with lock:
                    answers.append(status)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        engine.dispose()
    assert errors == []
    assert answers == [Status.PENDING] * 360


@pytest.mark.parametrize("via", ["engine", "listen_url"])
def test_the_listener_is_named_at_connect_time(bouncer: PgBouncer, via: str) -> None:
    """A startup parameter (source "client"), never a SET on the session ("session"),
    which a pooler could leave on a server connection that another client gets."""
    engine = create_engine(
        make_url(bouncer.direct_url).update_query_dict({"application_name": "app"}),
        poolclass=NullPool,
    )
    url = make_url(bouncer.direct_url).update_query_dict({"application_name": "app"})
    jobs = Jobs(engine, Analysis, listen_url=url if via == "listen_url" else None)
    listener: Any = jobs._backend.listener()
    try:
        listener.connect()
        row = listener._conn.execute(
            "SELECT setting, source FROM pg_settings WHERE name = 'application_name'"
        ).fetchone()
    finally:
        listener.close()
        engine.dispose()
    assert tuple(row) == ("app dbcancel-listener", "client")


def test_the_listener_name_stays_on_the_listener(bouncer: PgBouncer, pooled: Engine) -> None:
    """Through the pooler, no query of another client runs under the listener's name."""
    jobs = Jobs(pooled, Analysis, interval=0.2)
    job = add_job(bouncer)
    named = create_engine(
        make_url(bouncer.pooler_url).update_query_dict({"application_name": "other"}),
        poolclass=NullPool,
        connect_args=NO_PREPARE,
    )
    nameless = create_engine(bouncer.pooler_url, poolclass=NullPool, connect_args=NO_PREPARE)
    seen: set[str] = set()
    try:
        worker = Worker(jobs, job)
        wait_until(lambda: jobs.stats().connections >= 1, 30, "the listener to connect")
        for _ in range(50):
            for others in (named, nameless):
                with others.connect() as conn:
                    name = conn.execute(text("SELECT current_setting('application_name')"))
                    seen.add(name.scalar_one())
        jobs.cancel(job, reason="done")
        worker.join()
    finally:
        named.dispose()
        nameless.dispose()
    assert not [name for name in seen if "dbcancel-listener" in name], seen


@pytest.mark.serial  # a bound on how soon the cancel is seen
def test_with_listen_url_a_cancel_arrives_by_notification(
    bouncer: PgBouncer, pooled: Engine
) -> None:
    interval = 5.0
    jobs = Jobs(pooled, Analysis, interval=interval, listen_url=bouncer.direct_url)
    job = add_job(bouncer)
    worker = Worker(jobs, job)
    wait_until(lambda: jobs.stats().listening, 30, "the direct listener to hear its probe")
    sent = cancel_elsewhere(bouncer, job)
    took = worker.join() - sent
    stats = jobs.stats()
    print(f"listen_url: a cancel observed {took:.3f}s after it committed (interval {interval}s)")
    assert stats.notifications >= 1
    assert took < interval / 2


@pytest.mark.serial  # a bound on how soon the cancel is seen
def test_without_listen_url_the_listener_is_not_listening_and_polls_see_cancels(
    bouncer: PgBouncer, pooled: Engine, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr("dbcancel._runtime.PROBE_TIMEOUT", 1.0)
    interval = 1.0
    jobs = Jobs(pooled, Analysis, interval=interval)
    job = add_job(bouncer)
    with caplog.at_level(logging.WARNING, logger="dbcancel"):
        worker = Worker(jobs, job)
        wait_until(lambda: "listen_url" in caplog.text, 30, "the warning that the probe never came")
        stats = jobs.stats()
        assert not stats.listening
        assert stats.connections >= 1  # the listener stays open, deaf
        sent = cancel_elsewhere(bouncer, job)
        took = worker.join() - sent
    print(f"behind the pooler: a cancel observed {took:.3f}s after it committed by polling")
    assert not jobs.stats().listening
    assert took < interval * 1.1 + 2.0


def test_bad_listen_url_values_are_refused_before_anything_is_opened(tmp_path: Path) -> None:
    pg = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    lite = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        with pytest.raises(ValueError, match="PostgreSQL URL"):
            Jobs(pg, Analysis, listen_url="mysql+pymysql://root@127.0.0.1/test")
        with pytest.raises(ValueError, match="PostgreSQL URL"):
            Jobs(pg, Analysis, listen_url="not a url")
        with pytest.raises(ValueError, match="no host"):
            Jobs(pg, Analysis, listen_url="postgresql:///app")
        with pytest.raises(TypeError, match="str or a sqlalchemy URL"):
            Jobs(pg, Analysis, listen_url=5432)
        with pytest.raises(ValueError, match="for PostgreSQL"):
            Jobs(lite, Analysis, listen_url="postgresql://u@db:5432/app")
        ok = Jobs(pg, Analysis, listen_url=make_url("postgresql+psycopg://u:p@db:5432/app"))
        assert ok.interval > 0
    finally:
        pg.dispose()
        lite.dispose()
    assert not (tmp_path / "jobs.db").exists()  # nothing was opened


@pytest.mark.serial  # a bound on how soon the cancel is seen
@pytest.mark.parametrize("listen", [True, False], ids=["listen_url", "through-the-pooler"])
def test_asyncjobs_listen_url_and_the_probe(
    bouncer: PgBouncer, listen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncJobs on an AsyncEngine through the pooler: with listen_url a cancel from
    another process arrives by notification (interval 5 s); without, listening stays
    False and a poll sees it (interval 1 s)."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from dbcancel import AsyncJobs

    monkeypatch.setattr("dbcancel._runtime.PROBE_TIMEOUT", 1.0)
    interval = 5.0 if listen else 1.0
    job = add_job(bouncer)

    async def main() -> tuple[float, bool, int]:
        engine = create_async_engine(bouncer.pooler_url, connect_args=NO_PREPARE)
        jobs = AsyncJobs(
            engine, Analysis, interval=interval, listen_url=bouncer.direct_url if listen else None
        )
        try:
            async with jobs.run(job) as cp:
                deadline = time.monotonic() + 30
                while not jobs.stats().listening and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                listening = jobs.stats().listening
                if not listen:
                    await asyncio.sleep(1.5)  # past the probe's time: still not listening
                    listening = jobs.stats().listening
                seen: list[float] = []

                async def loop() -> None:
                    while True:
                        try:
                            cp()
                        except Cancelled:
                            seen.append(time.time())
                            return
                        await asyncio.sleep(0.005)

                looping = asyncio.create_task(loop())
                sent = await asyncio.to_thread(cancel_elsewhere, bouncer, job)
                await asyncio.wait_for(looping, 60)
                return seen[0] - sent, listening, jobs.stats().notifications
        finally:
            await engine.dispose()

    took, listening, notifications = asyncio.run(main())
    print(f"AsyncJobs listen_url={listen}: cancel seen after {took:.3f}s, listening={listening}")
    assert listening is listen
    if listen:
        assert notifications >= 1
        assert took < interval / 2
    else:
        assert took < interval * 1.1 + 2.0
