"""dbcancel.contrib.dramatiq against real ``dramatiq`` worker processes on RabbitMQ.

One ``dramatiq`` command (two worker processes of eight threads each) consumes a queue
unique to the run. PostgreSQL only: the adapter's logic is the delivery core's, which
the Celery and Django Tasks tests run on every database.
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

from dbcancel import Jobs, Status
from dbcancel.contrib.dramatiq import SHUTDOWN_REASON
from tests.conftest import IN_CI, Database
from tests.contrib.queues import (
    Process,
    check_random_run,
    ran,
    random_cancels,
    sqlalchemy_rows,
    until,
)

dramatiq = pytest.importorskip("dramatiq")
from dramatiq.brokers.rabbitmq import RabbitmqBroker  # noqa: E402

BROKER = os.environ.get("DBCANCEL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
PROCESSES, THREADS = 2, 8
APP = "tests.contrib.dramatiq.dq_app"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database", ["postgresql"], indirect=True),
]


@dataclass
class Cluster:
    database: Database
    marks: Path
    queue: str
    broker: Any
    jobs: Jobs
    workers: list[Process] = field(default_factory=list)

    def start(self, name: str, queue: str, processes: int = PROCESSES) -> Process:
        cmd = [
            sys.executable, "-m", "dramatiq", APP, "--processes", str(processes),
            "--threads", str(THREADS), "--queues", queue, "--worker-shutdown-timeout", "20000",
        ]  # fmt: skip
        env = {
            "DBCANCEL_DQ_BROKER": BROKER,
            "DBCANCEL_DQ_QUEUE": self.queue,
            "DBCANCEL_DQ_DB": self.database.url,
            "DBCANCEL_DQ_MARKS": str(self.marks),
        }
        process = Process(cmd, env, self.marks / f"dramatiq-{name}.log")
        self.workers.append(process)
        until(
            lambda: (
                process.tail(200).count("Worker process is ready for action.") >= processes
                or process.proc.poll() is not None
            ),
            what=f"dramatiq {name} ready",
        )
        assert process.proc.poll() is None, process.tail()
        return process

    def send(self, actor: str, *args: Any, queue: str | None = None) -> None:
        message = dramatiq.Message(
            queue_name=queue or self.queue, actor_name=actor, args=args, kwargs={}, options={}
        )
        self.broker.enqueue(message)


@pytest.fixture(scope="module")
def cluster(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        broker = RabbitmqBroker(url=BROKER)
        broker.connection  # noqa: B018 - connects
    except Exception as err:
        if IN_CI:
            pytest.fail(
                f"RabbitMQ is not reachable: {err} (under CI=true every service must be up)"
            )
        pytest.skip(f"RabbitMQ is not reachable: {err}")
    queue = f"dbcancel-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for name in (queue, f"{queue}.later"):
        broker.declare_queue(name)
    c = Cluster(
        database, tmp_path_factory.mktemp("dramatiq"), queue, broker, database.jobs(heartbeat=0.2)
    )
    try:
        c.start("main", queue)
        yield c
    finally:
        for process in c.workers:
            process.stop(20)
        channel = broker.channel
        for name in (queue, f"{queue}.later"):
            for q in (name, f"{name}.DQ", f"{name}.XQ"):
                channel.queue_delete(q)
        broker.close()


@pytest.fixture
def dq(cluster: Cluster, db: Database) -> Cluster:
    for path in cluster.marks.glob("ran-*"):
        path.unlink()
    return cluster


def test_cancel_before_pickup_never_runs_the_body(db: Database, dq: Cluster) -> None:
    cancelled, control = db.add(), db.add()
    later = f"{dq.queue}.later"
    dq.send("loop_later", cancelled, 3, 0.01, queue=later)
    dq.send("loop_later", control, 3, 0.01, queue=later)
    assert dq.jobs.cancel(cancelled, reason="user deleted it") is True
    worker = dq.start("later", later, processes=1)
    assert dq.jobs.wait(control, timeout=30) is Status.COMPLETED
    until(
        lambda: f"({cancelled}, 3, 0.01) with expected exception JobCancelled" in worker.text(),
        what="the cancelled message failed",
    )
    assert ran(dq.marks, cancelled) == []
    row = db.row(cancelled)
    assert row is not None
    assert (row.status, row.started_at) == (Status.CANCELLED, None)
    assert len(ran(dq.marks, control)) == 1
    worker.stop()


def test_retry_after_a_transient_error_runs_the_body_again(db: Database, dq: Cluster) -> None:
    job_id, spent = db.add(), db.add()
    dq.send("flaky", job_id, 1)
    assert dq.jobs.wait(job_id, timeout=30) is Status.COMPLETED
    row = db.row(job_id)
    assert row is not None
    assert (row.attempts, row.error) == (2, "Retry: transient 1")
    assert len(ran(dq.marks, job_id)) == 2

    # Retries spent (max_retries=2): the last error fails the job.
    dq.send("fragile", spent)
    assert dq.jobs.wait(spent, timeout=30) is Status.FAILED
    row = db.row(spent)
    assert row is not None
    assert (row.attempts, row.error) == (3, "OSError: disk full")
    assert len(ran(dq.marks, spent)) == 3


def test_a_retry_after_a_cancel_never_runs(db: Database, dq: Cluster) -> None:
    job_id = db.add()
    dq.send("flaky", job_id, 9, 1000)  # the retry comes a second later
    until(lambda: ran(dq.marks, job_id), what="the first attempt")
    until(lambda: dq.jobs.status(job_id) is Status.PENDING, what="pending for its retry")
    assert dq.jobs.cancel(job_id, reason="user deleted it") is True
    assert dq.jobs.wait(job_id, timeout=5) is Status.CANCELLED
    # The retry is delivered, finds the job cancelled, and fails without running.
    until(
        lambda: (
            f"flaky({job_id}, 9, 1000) with expected exception JobCancelled" in dq.workers[0].text()
        ),
        what="the retry failed with JobCancelled",
    )
    assert len(ran(dq.marks, job_id)) == 1


def test_random_cancels_over_the_threads(db: Database, dq: Cluster) -> None:
    n = int(os.environ.get("DBCANCEL_DQ_JOBS", "200"))
    rng = random.Random(int(os.environ.get("DBCANCEL_DQ_SEED", "1")))
    ids = [db.add() for _ in range(n)]
    for job_id in ids:
        dq.send("loop", job_id, rng.randint(3, 25), 0.02)
    slots = PROCESSES * THREADS
    cancelled = random_cancels(
        sqlalchemy_rows(db), dq.jobs, ids, slots, seed=rng.randrange(1 << 30)
    )
    check_random_run(sqlalchemy_rows(db), dq.jobs, ids, cancelled, lambda j: ran(dq.marks, j))


def test_sigkill_of_a_worker_is_reaped(db: Database, dq: Cluster) -> None:
    own = f"{dq.queue}.later"
    killed = dq.start("k", own, processes=1)
    lost = db.add()
    dq.send("loop_later", lost, 3000, 0.02, queue=own)
    until(lambda: dq.jobs.status(lost) is Status.IN_PROGRESS, what="the job running")
    killed.kill()  # the dramatiq command and its worker process
    until(lambda: dq.jobs.reap(stale_after=1.0), what="the killed worker's job reaped")
    assert dq.jobs.wait(lost, timeout=10) is Status.FAILED
    row = db.row(lost)
    assert row is not None
    assert row.error == "worker lost"
    after = db.add()
    dq.send("loop", after, 2, 0.01)
    assert dq.jobs.wait(after, timeout=30) is Status.COMPLETED


def test_warm_shutdown_cancels_the_running_jobs(db: Database, dq: Cluster) -> None:
    own = f"{dq.queue}.later"
    node = dq.start("w", own, processes=1)
    ids = [db.add(), db.add()]
    for job_id in ids:
        dq.send("loop_later", job_id, 3000, 0.02, queue=own)
    until(
        lambda: all(dq.jobs.status(j) is Status.IN_PROGRESS for j in ids),
        what="the jobs running",
    )
    node.proc.send_signal(signal.SIGTERM)  # dramatiq's warm shutdown
    assert node.proc.wait(30) == 0, node.tail()
    for job_id in ids:
        assert dq.jobs.wait(job_id, timeout=5) is Status.CANCELLED
        row = db.row(job_id)
        assert row is not None
        assert (row.cancel_reason, row.cancel_observed_at is not None) == (SHUTDOWN_REASON, True)
