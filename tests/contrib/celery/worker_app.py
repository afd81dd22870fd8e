"""The Celery app the worker subprocesses of the tests run (``celery -A ...worker_app``).

Everything comes from environment variables set by the test that starts the worker:
``DBCANCEL_CELERY_BROKER``, ``DBCANCEL_CELERY_BACKEND``, ``DBCANCEL_CELERY_DB`` (the
database URL, with the test run's schema), ``DBCANCEL_CELERY_MARKS`` (a folder where each
body run appends a line to ``ran-<job id>`` and readiness writes ``ready-<node>``),
``DBCANCEL_CELERY_NODE`` (the node's short name) and ``DBCANCEL_CELERY_ON_SHUTDOWN``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals
from sqlalchemy import create_engine

from dbcancel import Checkpoint
from dbcancel.contrib.celery import CeleryJobs
from tests.models import Analysis

MARKS = Path(os.environ.get("DBCANCEL_CELERY_MARKS", "."))
NODE = os.environ.get("DBCANCEL_CELERY_NODE", "node")


def client(broker: str, backend: str) -> Celery:
    """A Celery app with the workers' settings, for the test process to send with."""
    app = Celery("dbcancel_test", broker=broker, backend=backend)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=3600,
    )
    return app


app = client(
    os.environ.get("DBCANCEL_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("DBCANCEL_CELERY_BACKEND", "redis://127.0.0.1:6379/0"),
)

_url = os.environ.get("DBCANCEL_CELERY_DB", "sqlite:///celery-test.db")
# Built at import, in the process that forks the pool: the case CeleryJobs must handle.
engine = (
    create_engine(_url, connect_args={"timeout": 30})
    if _url.startswith("sqlite")
    else (create_engine(_url, pool_pre_ping=True))
)
cancellable = CeleryJobs(
    app,
    engine,
    Analysis,
    interval=0.1,
    heartbeat=0.2,
    on_shutdown=os.environ.get("DBCANCEL_CELERY_ON_SHUTDOWN", "cancel"),  # type: ignore[arg-type]
)


def mark(job_id: int) -> None:
    """Record that the body of ``job_id`` ran here (one line per run)."""
    with open(MARKS / f"ran-{job_id}", "a", encoding="utf-8") as f:
        f.write(f"{NODE} {os.getpid()}\n")


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    (MARKS / f"ready-{NODE}").write_text(str(os.getpid()), encoding="utf-8")


def loop(cp: Checkpoint, job_id: int, steps: int, step_seconds: float) -> int:
    """A worker loop: ``steps`` items of ``step_seconds`` each, one checkpoint per item."""
    mark(job_id)
    for _ in range(steps):
        cp()
        time.sleep(step_seconds)  # the work of one item
    return steps


analyse = cancellable.task(name="dbcancel_test.analyse")(loop)


# Acknowledged after it ran: the message of a killed worker is delivered again.
analyse_late = cancellable.task(name="dbcancel_test.analyse_late", acks_late=True)(loop)


@cancellable.task(
    name="dbcancel_test.fragile",
    autoretry_for=(OSError,),
    max_retries=3,
    default_retry_delay=0.2,
)
def fragile(cp: Checkpoint, job_id: int, fail_at_once: bool) -> str:
    """Fails with OSError at once, or once a cancel has closed its "connection"."""
    mark(job_id)
    if fail_at_once:
        raise OSError("disk full")
    closed = threading.Event()
    cp.on_cancel(closed.set)  # stands in for closing the socket the body reads
    deadline = time.monotonic() + 60
    while not closed.wait(0.05) and time.monotonic() < deadline:
        cp.poll()  # observes a cancel (and runs on_cancel) without raising
    raise OSError("connection closed")


@cancellable.task(name="dbcancel_test.bound", bind=True)
def bound(task: Any, cp: Checkpoint, job_id: int) -> str:
    """A bound body: gets the task first."""
    mark(job_id)
    cp()
    return str(task.request.id)


def runs(job_id: int) -> int:
    """How many times the body of ``job_id`` ran, on any node."""
    path = MARKS / f"ran-{job_id}"
    return len(path.read_text().splitlines()) if path.exists() else 0


@cancellable.task(
    name="dbcancel_test.flaky",
    autoretry_for=(OSError,),
    max_retries=3,
    default_retry_delay=0.05,
)
def flaky(cp: Checkpoint, job_id: int, failures: int) -> int:
    """Fails with a transient OSError on its first ``failures`` runs, then succeeds."""
    mark(job_id)
    cp()
    if runs(job_id) <= failures:
        raise OSError("transient")
    return runs(job_id)


@cancellable.task(name="dbcancel_test.retry_later", bind=True, max_retries=3)
def retry_later(task: Any, cp: Checkpoint, job_id: int, countdown: float) -> str:
    """Asks for a retry in ``countdown`` seconds on its first run; succeeds on the next."""
    mark(job_id)
    if task.request.retries == 0:
        raise task.retry(exc=OSError("try later"), countdown=countdown)
    cp()
    return f"attempt {task.request.retries + 1}"
