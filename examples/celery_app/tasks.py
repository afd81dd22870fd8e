"""A Celery app whose tasks stop through the database: ``dbcancel.contrib.celery``.

How to start a worker, submit and cancel jobs, and stop it: README.md beside this file.
``BROKER_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``), ``RESULT_BACKEND``
(default ``redis://127.0.0.1:6379/0``), ``DATABASE_URL`` (default ``sqlite:///analysis.db``)
and ``QUEUE`` (default ``analysis``) point elsewhere.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from celery import Celery
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dbcancel import CancellableMixin, Checkpoint, Status
from dbcancel.contrib.celery import CeleryJobs


class Base(DeclarativeBase):
    pass


class Analysis(CancellableMixin, Base):
    __tablename__ = "analysis"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))


app = Celery(
    "tasks",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.broker_connection_retry_on_startup = True
app.conf.task_default_queue = os.environ.get("QUEUE", "analysis")
engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///analysis.db"))
Base.metadata.create_all(engine)
# Connects the worker signals: prefork children get their own engine pool and Jobs; a
# warm shutdown cancels the running jobs ("worker shutdown").
cancellable = CeleryJobs(app, engine, Analysis, interval=0.5)


# A plain logger: the cancel line comes from the runtime thread, outside the task's
# context. The worker prints INFO lines with --loglevel INFO.
log = logging.getLogger("analyses")


@cancellable.task(autoretry_for=(ConnectionError,), max_retries=3)
def analyse(cp: Checkpoint, job_id: int, files: int) -> int:
    """The task body runs inside ``jobs.run(job_id)``: completed, failed or cancelled."""
    log.info("analysis %s started: %d files", job_id, files)
    # Runs where the cancel is seen (the runtime thread): the body stops at its next cp().
    cp.on_cancel(lambda: log.info("analysis %s cancelled: %s", job_id, cp.reason))
    for _ in range(files):
        cp()  # raises Cancelled once the job is cancelled, from any process
        time.sleep(0.1)  # the work of one file
    log.info("analysis %s completed: %d files", job_id, files)
    return files


def new_job(user_id: str) -> int:
    """Insert a pending job row and return its id."""
    with Session(engine) as session, session.begin():
        job = Analysis(user_id=user_id)
        session.add(job)
        session.flush()
        return job.id


def main() -> int:
    """Submit two jobs, cancel one while it runs; print how both ended."""
    jobs = cancellable.jobs
    keep, stop = new_job("alice"), new_job("alice")
    kept = analyse.delay(keep, 5)
    stopped = analyse.delay(stop, 600)
    deadline = time.monotonic() + 60
    while jobs.status(stop) is Status.PENDING and time.monotonic() < deadline:
        time.sleep(0.05)
    print("cancelling", stop)
    jobs.cancel(stop, reason="user deleted it", where={"user_id": "alice"})
    print("stopped:", jobs.wait(stop, timeout=30).value)  # cancelled
    stopped.get(timeout=30, propagate=False)  # the worker records REVOKED as it stops
    print("celery:", stopped.state)  # REVOKED
    print("kept:", jobs.wait(keep, timeout=60).value, kept.get(timeout=30))  # completed 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
