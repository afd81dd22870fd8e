"""One worker process of the connection budget test (``test_connection_budget.py``).

``python -m tests.integration.budget_worker URL JOB_ID``: runs job ``JOB_ID`` of each of
three job tables at once (one ``Jobs`` per table, one thread per job, a CPU-light loop
of checkpoints), prints ``listening`` once notifications reach the process, and when
all three jobs have been cancelled prints the most connections ``stats()`` reported.
"""

from __future__ import annotations

import sys
import threading
import time

from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import CancellableMixin, Cancelled, Jobs

INTERVAL = 0.2


class Base(DeclarativeBase):
    pass


class BudgetA(CancellableMixin, Base):
    __tablename__ = "budget_a"
    id: Mapped[int] = mapped_column(primary_key=True)


class BudgetB(CancellableMixin, Base):
    __tablename__ = "budget_b"
    id: Mapped[int] = mapped_column(primary_key=True)


class BudgetC(CancellableMixin, Base):
    __tablename__ = "budget_c"
    id: Mapped[int] = mapped_column(primary_key=True)


MODELS = (BudgetA, BudgetB, BudgetC)


def main(url: str, job_id: int) -> None:
    # pool_size=1: the application's own pool keeps one connection, the one the
    # runtime borrows; overflow connections close when given back, so a second one
    # held at once would show in pg_stat_activity.
    engine = create_engine(url, pool_size=1, max_overflow=20)
    all_jobs = [Jobs(engine, model, interval=INTERVAL) for model in MODELS]
    started = threading.Barrier(len(MODELS) + 1)
    most = [0]

    def work(jobs: Jobs) -> None:
        try:
            with jobs.run(job_id) as cp:
                started.wait()
                while True:
                    cp()
                    most[0] = max(most[0], jobs.stats().connections)
                    time.sleep(0.01)
        except Cancelled:
            pass

    threads = [threading.Thread(target=work, args=(jobs,)) for jobs in all_jobs]
    for thread in threads:
        thread.start()
    started.wait()
    deadline = time.monotonic() + 30
    while not all(j.stats().listening for j in all_jobs):  # poll-until: no event to wait on
        if time.monotonic() > deadline:
            print("not listening", flush=True)
            break
        time.sleep(0.02)
    else:
        print("listening", flush=True)
    for thread in threads:
        thread.join()
    print(f"most connections {most[0]}", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
