"""The connection budget of a fleet, counted in ``pg_stat_activity``.

Docs (docs/fleets.md) state: per process and database, dbcancel's runtime holds at most
one connection for its polls, heartbeats and probes, plus one listener connection for
all the database's job tables. Fleets of 1, 10 and 50 worker processes, each running
one job in each of three job tables, are counted against that formula on a throwaway
PostgreSQL server of their own. Each process's engine keeps a pool of one connection
(the one the runtime borrows), and its overflow connections close when given back, so a
second connection held at once would be counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from dbcancel import Jobs, Status
from dbcancel._runtime import runtime

from .budget_worker import MODELS, Base
from .servers import Server, throwaway

# Throwaway servers and pooler processes: what they test does not change with the
# Python version, so they run on the first Python of test-all only.
pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DATABASES = 1
START_TIMEOUT = 60.0


def budget(processes: int) -> int:
    """The formula of docs/fleets.md: per process, 1 runtime connection and 1 listener
    per database (the application's own pool of one is the runtime's connection)."""
    return processes * (1 + DATABASES)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = throwaway("postgresql", {"max_connections": 200})
    admin = create_engine(srv.url, poolclass=NullPool)
    try:
        Base.metadata.create_all(admin)
        yield srv
    finally:
        admin.dispose()
        srv.remove()


def count(admin, tag: str) -> tuple[int, int]:
    """(all connections, listener connections) named after `tag` now."""
    with admin.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), "
                "count(*) FILTER (WHERE application_name LIKE '%dbcancel-listener') "
                "FROM pg_stat_activity WHERE application_name LIKE :tag"
            ),
            {"tag": tag + "%"},
        ).one()
    return int(row[0]), int(row[1])


def run_fleet(server: Server, processes: int) -> dict[str, object]:
    tag = f"budget-{uuid.uuid4().hex[:8]}"
    url = make_url(server.url).update_query_dict({"application_name": tag})
    admin = create_engine(server.url, poolclass=NullPool)
    with admin.begin() as conn:
        for model in MODELS:
            conn.execute(delete(model))
            conn.execute(insert(model), [{"id": i} for i in range(1, processes + 1)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.budget_worker",
            url.render_as_string(hide_password=False),
            str(processes),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Each worker says once notifications reach it (it gives up after 60 s).
        said = sorted(fleet.stdout.readline().split()[-1] for _ in range(processes))  # type: ignore[union-attr]
        assert said == ["listening"] * processes, said
        with admin.connect() as conn:
            in_progress = sum(
                conn.execute(
                    text(f"SELECT count(*) FROM {m.__tablename__} WHERE status = :s"),
                    {"s": Status.IN_PROGRESS.value},
                ).scalar_one()
                for m in MODELS
            )
        assert in_progress == 3 * processes
        samples = []
        for _ in range(40):  # two seconds of samples: ten polls of every table
            samples.append(count(admin, tag))
            time.sleep(0.05)
        most = max(total for total, _ in samples)
        listeners = max(lst for _, lst in samples)
        for model in MODELS:
            jobs = Jobs(admin, model)
            for i in range(1, processes + 1):
                jobs.cancel(i, reason="budget measured")
        out, _ = fleet.communicate(timeout=START_TIMEOUT)
        assert fleet.returncode == 0, out
        reported = [int(line.split()[-1]) for line in out.splitlines() if " most " in line]
        assert len(reported) == processes, out
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
        admin.dispose()
    return {"most": most, "listeners": listeners, "reported": max(reported)}


@pytest.mark.parametrize(
    "processes",
    [
        1,
        pytest.param(10, marks=pytest.mark.serial),
        pytest.param(50, marks=[pytest.mark.slow, pytest.mark.serial]),
    ],
)
def test_a_fleet_holds_at_most_the_stated_connections(
    server: Server, processes: int, record_property: pytest.RecordProperty
) -> None:
    started = time.monotonic()
    measured = run_fleet(server, processes)
    record_property("connections", measured)
    print(
        f"{processes} process(es) x 3 tables: at most {measured['most']} connections "
        f"({measured['listeners']} listeners) measured, formula {budget(processes)}; "
        f"stats().connections at most {measured['reported']} per process; "
        f"{time.monotonic() - started:.1f}s"
    )
    assert measured["listeners"] == processes * DATABASES  # one for all three tables
    assert measured["most"] <= budget(processes)
    assert 1 <= measured["reported"] <= 1 + DATABASES


class _Counting:
    """Counts the runtime's round trips of one database in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    def around(self, call: Callable[[], object]) -> object:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.005)  # widen the window in which a second one could overlap
            return call()
        finally:
            with self.lock:
                self.now -= 1


def test_polls_beats_and_probes_of_one_database_take_turns(server: Server) -> None:
    """Three tables of one database, jobs starting from three threads while the runtime
    polls every 10 ms: the first beat of each start (in the job's thread), the polls
    and the probe never run at once."""
    from dbcancel._sqla import SQLAlchemyBackend

    counting = _Counting()

    class Counted(SQLAlchemyBackend):
        def read_many(self, job_ids: Any) -> Any:
            return counting.around(lambda: super(Counted, self).read_many(job_ids))

        def beat_worker(self, worker_id: str, period: float) -> None:
            counting.around(lambda: super(Counted, self).beat_worker(worker_id, period))

        def notify(self, channel: str, payload: str) -> None:
            counting.around(lambda: super(Counted, self).notify(channel, payload))

    engine = create_engine(server.url, pool_size=1, max_overflow=20)
    admin = create_engine(server.url, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            for model in MODELS:
                conn.execute(delete(model))
                conn.execute(insert(model), [{"id": i} for i in range(1, 21)])
        all_jobs = [
            Jobs.from_backend(Counted(engine, model), interval=0.01, heartbeat=0.05)
            for model in MODELS
        ]
        go = threading.Barrier(len(all_jobs))

        def work(jobs: Jobs) -> None:
            go.wait()
            for job_id in range(1, 21):
                with jobs.run(job_id) as cp:
                    for _ in range(5):
                        cp()
                        time.sleep(0.01)
                runtime().close_idle(0)  # idle now: the next start beats in this thread

        threads = [threading.Thread(target=work, args=(jobs,)) for jobs in all_jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        runtime().close_idle(10)
        engine.dispose()
        admin.dispose()
    print(f"{counting.calls} round trips of the runtime, at most {counting.most} at once")
    assert counting.calls > 60
    assert counting.most == 1
