"""dbcancel.contrib.rq against real ``rq worker`` processes on Redis.

Four workers (one with RQ's scheduler, for retries with an interval) consume a queue
unique to the run; each RQ job runs in a work horse the worker forks for it, with its
own engine, runtime thread and heartbeat. PostgreSQL only: the adapter's logic is the
delivery core's, which the Celery and Django Tasks tests run on every database.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from dbcancel import Jobs, Status
from tests.conftest import IN_CI, Database
from tests.contrib.queues import (
    Process,
    check_random_run,
    ran,
    random_cancels,
    sqlalchemy_rows,
    until,
)
from tests.models import Analysis

rq = pytest.importorskip("rq")
from rq import Queue, Retry, Worker  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402

REDIS = os.environ.get("DBCANCEL_TEST_REDIS", "redis://127.0.0.1:6379/0")
LOOP = "tests.contrib.rq.rq_app.loop"
FLAKY = "tests.contrib.rq.rq_app.flaky"
WORKERS = 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database", ["postgresql"], indirect=True),
]


@dataclass
class Cluster:
    database: Database
    marks: Path
    token: str
    redis: Any
    queue: Any
    jobs: Jobs
    workers: list[Process] = field(default_factory=list)

    def start(self, queue: str, name: str, *extra: str) -> Process:
        cmd = [
            sys.executable, "-m", "rq.cli", "worker", "-u", REDIS, "-n", f"{name}-{self.token}",
            "--logging_level", "WARNING", "-w", "tests.contrib.rq.rq_app.Worker", *extra, queue,
        ]  # fmt: skip
        env = {"DBCANCEL_RQ_DB": self.database.url, "DBCANCEL_RQ_MARKS": str(self.marks)}
        process = Process(cmd, env, self.marks / f"worker-{name}.log")
        self.workers.append(process)
        return process

    def rq_job(self, job: Any) -> Any:
        return Job.fetch(job.id, connection=self.redis)

    def ended(self, job: Any, timeout: float = 60.0) -> Any:
        """Wait until the RQ job is finished or failed; return it, refreshed."""
        done = {JobStatus.FINISHED, JobStatus.FAILED}
        until(lambda: self.rq_job(job).get_status() in done, timeout, f"RQ job {job.id}")
        return self.rq_job(job)


@pytest.fixture(scope="module")
def cluster(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    connection = redis.Redis.from_url(REDIS, socket_timeout=5)
    try:
        connection.ping()
    except Exception as err:
        if IN_CI:
            pytest.fail(f"Redis is not reachable: {err} (under CI=true every service must be up)")
        pytest.skip(f"Redis is not reachable: {err}")
    token = uuid.uuid4().hex[:8]
    marks = tmp_path_factory.mktemp("rq")
    queue = Queue(f"dbcancel-test-{os.getpid()}-{token}", connection=connection)
    c = Cluster(database, marks, token, connection, queue, database.jobs(heartbeat=0.2))
    try:
        for n in range(WORKERS):
            c.start(queue.name, f"w{n}", *(["--with-scheduler"] if n == 0 else []))
        until(
            lambda: len(Worker.all(queue=queue)) >= WORKERS,
            what="the RQ workers registered",
        )
        yield c
    finally:
        for process in c.workers:
            process.stop(10)
        for name in list(connection.scan_iter(f"rq:*{token}*")):
            connection.delete(name)
        connection.close()


@pytest.fixture
def rqc(cluster: Cluster, db: Database) -> Cluster:
    for path in cluster.marks.glob("ran-*"):
        path.unlink()
    return cluster


def test_cancel_before_pickup_never_runs_the_body(db: Database, rqc: Cluster) -> None:
    later = Queue(f"{rqc.queue.name}.later", connection=rqc.redis)
    cancelled, control = db.add(), db.add()
    r_cancelled = later.enqueue(LOOP, cancelled, 3, 0.01, retry=Retry(max=3))
    r_control = later.enqueue(LOOP, control, 3, 0.01)
    assert rqc.jobs.cancel(cancelled, reason="user deleted it") is True
    burst = rqc.start(later.name, "burst", "--burst")
    assert burst.proc.wait(60) == 0, burst.tail()

    failed = rqc.ended(r_cancelled)
    assert failed.get_status() == JobStatus.FAILED
    assert "JobCancelled: Analysis" in failed.latest_result().exc_string
    assert "user deleted it" in failed.latest_result().exc_string
    assert failed.retries_left == 0  # a cancelled job is never retried
    assert ran(rqc.marks, cancelled) == []
    row = db.row(cancelled)
    assert row is not None
    assert (row.status, row.started_at) == (Status.CANCELLED, None)
    assert rqc.ended(r_control).return_value() == 3
    assert len(ran(rqc.marks, control)) == 1


def test_retry_after_a_transient_error_runs_the_body_again(db: Database, rqc: Cluster) -> None:
    job_id = db.add()
    r_job = rqc.queue.enqueue(FLAKY, job_id, 1, retry=Retry(max=3))
    assert rqc.ended(r_job).return_value() == 2
    row = db.row(job_id)
    assert row is not None
    assert (row.status, row.attempts, row.error) == (Status.COMPLETED, 2, "OSError: transient")
    assert len(set(ran(rqc.marks, job_id))) == 2  # two runs, each in a horse of its own

    # Retries spent: the last error fails the job.
    spent = db.add()
    r_spent = rqc.queue.enqueue(FLAKY, spent, 9, retry=Retry(max=2))
    assert rqc.ended(r_spent).get_status() == JobStatus.FAILED
    row = db.row(spent)
    assert row is not None
    assert (row.status, row.attempts) == (Status.FAILED, 3)


def test_a_retry_after_a_cancel_never_runs(db: Database, rqc: Cluster) -> None:
    job_id = db.add()
    r_job = rqc.queue.enqueue(FLAKY, job_id, 9, retry=Retry(max=3, interval=1))
    until(lambda: ran(rqc.marks, job_id), what="the first attempt")
    until(lambda: rqc.jobs.status(job_id) is Status.PENDING, what="pending for its retry")
    assert rqc.jobs.cancel(job_id, reason="user deleted it") is True
    failed = rqc.ended(r_job)
    assert failed.get_status() == JobStatus.FAILED
    assert "JobCancelled" in failed.latest_result().exc_string
    assert len(ran(rqc.marks, job_id)) == 1
    assert rqc.jobs.wait(job_id, timeout=5) is Status.CANCELLED


def test_random_cancels_over_the_workers(db: Database, rqc: Cluster) -> None:
    n = int(os.environ.get("DBCANCEL_RQ_JOBS", "200"))
    rng = random.Random(int(os.environ.get("DBCANCEL_RQ_SEED", "1")))
    ids = [db.add() for _ in range(n)]
    enqueued = {j: rqc.queue.enqueue(LOOP, j, rng.randint(1, 8), 0.01) for j in ids}
    cancelled = random_cancels(
        sqlalchemy_rows(db), rqc.jobs, ids, WORKERS, seed=rng.randrange(1 << 30)
    )
    final = check_random_run(
        sqlalchemy_rows(db), rqc.jobs, ids, cancelled, lambda j: ran(rqc.marks, j)
    )
    for job_id, r_job in enqueued.items():
        want = JobStatus.FAILED if final[job_id] is Status.CANCELLED else JobStatus.FINISHED
        assert rqc.ended(r_job).get_status() == want, job_id


def test_sigkill_of_a_worker_is_reaped(db: Database, rqc: Cluster) -> None:
    own = f"{rqc.queue.name}.k"
    killed = rqc.start(own, "k")
    lost = db.add()
    Queue(own, connection=rqc.redis).enqueue(LOOP, lost, 3000, 0.02)
    until(lambda: rqc.jobs.status(lost) is Status.IN_PROGRESS, what="the job running")
    horse = int(until(lambda: ran(rqc.marks, lost), what="the horse's pid")[0])
    killed.kill()  # the worker; its horse is in a process group of its own
    os.kill(horse, signal.SIGKILL)
    until(lambda: rqc.jobs.reap(stale_after=1.0), what="the killed worker's job reaped")
    assert rqc.jobs.wait(lost, timeout=10) is Status.FAILED
    row = db.row(lost)
    assert row is not None
    assert row.error == "worker lost"
    after = db.add()
    r_after = rqc.queue.enqueue(LOOP, after, 2, 0.01)
    assert rqc.ended(r_after).return_value() == 2
    with db.sessions() as s:
        assert s.get(Analysis, after).status is Status.COMPLETED
