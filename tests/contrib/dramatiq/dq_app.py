"""The actors the ``dramatiq`` worker subprocesses of the tests run.

Configured by environment variables set by the test that starts the workers:
``DBCANCEL_DQ_BROKER`` (RabbitMQ), ``DBCANCEL_DQ_QUEUE`` (a queue name unique to the run),
``DBCANCEL_DQ_DB`` (the database URL, with the test run's schema) and
``DBCANCEL_DQ_MARKS`` (a folder where each body run appends ``<pid>`` to ``ran-<job id>``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import create_engine

from dbcancel import Checkpoint
from dbcancel.contrib.dramatiq import DramatiqJobs
from tests.models import Analysis

MARKS = Path(os.environ.get("DBCANCEL_DQ_MARKS", "."))
QUEUE = os.environ.get("DBCANCEL_DQ_QUEUE", "dbcancel-test")

dramatiq.set_broker(
    RabbitmqBroker(url=os.environ.get("DBCANCEL_DQ_BROKER", "amqp://guest:guest@127.0.0.1:5672")),
)
engine = create_engine(os.environ.get("DBCANCEL_DQ_DB", "sqlite:///dq-test.db"), pool_pre_ping=True)
cancellable = DramatiqJobs(engine, Analysis, interval=0.05, heartbeat=0.2)


def mark(job_id: int) -> int:
    """Record that the body of ``job_id`` ran in this process; return how many times."""
    path = MARKS / f"ran-{job_id}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def _loop(cp: Checkpoint, job_id: int, steps: int, step_seconds: float) -> int:
    mark(job_id)
    for _ in range(steps):
        cp()
        time.sleep(step_seconds)  # the work of one item
    return steps


loop = cancellable.task(actor_name="loop", queue_name=QUEUE, max_retries=0)(_loop)
loop_later = cancellable.task(actor_name="loop_later", queue_name=f"{QUEUE}.later")(_loop)


@cancellable.task(actor_name="flaky", queue_name=QUEUE, max_retries=3, min_backoff=50)
def flaky(cp: Checkpoint, job_id: int, failures: int, backoff_ms: int = 50) -> int:
    """Fails with a transient OSError on its first ``failures`` runs, then succeeds."""
    runs = mark(job_id)
    cp()
    if runs <= failures:
        raise dramatiq.Retry(f"transient {runs}", delay=backoff_ms)
    return runs


@cancellable.task(actor_name="fragile", queue_name=QUEUE, max_retries=2, min_backoff=50)
def fragile(cp: Checkpoint, job_id: int) -> None:
    """Fails every time."""
    mark(job_id)
    raise OSError("disk full")
