"""One worker process of the connection budget test (``test_connection_budget.py``).

``python -m tests.integration.budget_worker URL COUNT``: forks COUNT worker processes
(the imports are paid once, in this parent). Worker ``i`` (1 to COUNT) runs job ``i``
of each of three job tables at once (one ``Jobs`` per table, one thread per job, a
CPU-light loop of checkpoints), prints ``i listening`` once notifications reach it,
and once all three jobs have been cancelled ``i most N``: the most connections its
``stats()`` reported. The parent exits non-zero if a worker failed.
"""

from __future__ import annotations

import os
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
    deadline = time.monotonic() + 60
    while not all(j.stats().listening for j in all_jobs):  # poll-until: no event to wait on
        if time.monotonic() > deadline:
            say(f"{job_id} not listening")
            break
        time.sleep(0.02)
    else:
        say(f"{job_id} listening")
    for thread in threads:
        thread.join()
    say(f"{job_id} most {most[0]}")
    engine.dispose()


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write: lines of the workers never mix


def fleet(url: str, count: int) -> int:
    children = []
    for job_id in range(1, count + 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                main(url, job_id)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(fleet(sys.argv[1], int(sys.argv[2])))
