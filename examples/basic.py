"""The smallest complete use of dbcancel: a worker thread stopped through the database.

Run it: ``python examples/basic.py [DATABASE_URL]`` (default: a SQLite file in a temporary
folder). It starts a job in a thread, cancels it from the main thread, waits until the
worker has really stopped and prints what happened.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dbcancel import CancellableMixin, Jobs


class Base(DeclarativeBase):
    pass


class Analysis(CancellableMixin, Base):
    __tablename__ = "example_analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))


def main(url: str) -> int:
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    jobs = Jobs(engine, Analysis, interval=0.1)
    with Session(engine) as session, session.begin():
        job = Analysis(user_id="alice")
        session.add(job)
        session.flush()
        job_id = job.id

    started = threading.Event()
    processed = 0

    def worker() -> None:
        nonlocal processed
        with jobs.run(job_id) as cp:
            cp.on_cancel(lambda: print("  on_cancel: closing the worker's resources"))
            started.set()
            for _item in range(1_000_000):
                cp()  # raises Cancelled once the job is cancelled; run() swallows it
                time.sleep(0.001)  # the work of one item
                processed += 1

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    time.sleep(0.2)  # let it work a little
    cancelled = jobs.cancel(job_id, reason="user deleted the session", where={"user_id": "alice"})
    print(f"cancel -> {cancelled}")
    print(f"wait   -> {jobs.wait(job_id, timeout=10).value}")
    thread.join()
    print(f"status -> {jobs.status(job_id).value} after {processed} items")
    # Only the example's own table: the worker table may serve other job tables here.
    Analysis.__table__.drop(engine)
    engine.dispose()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(f"sqlite:///{Path(tmp) / 'jobs.db'}"))
