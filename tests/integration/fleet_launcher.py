"""Start a fleet of worker processes, one job each, for the fleet test and benchmark.

    python -m tests.integration.fleet_launcher URL PUSH MODE INTERVAL STOP ID [ID ...]

Importing SQLAlchemy, psycopg, redis-py and dbcancel costs a Python process a second or
more of CPU; two hundred of them would spend minutes on imports alone on a small box.
So this script imports once, builds one engine (psycopg, `prepare_threshold=None` for
PgBouncer's transaction pooling, a pool of one connection and one more for the runtime
thread's poll) and one `Jobs`, warms them up (identity resolved, statements compiled,
connections closed), and forks one child per job id: each child opens its own
connections and runs its runtime, and runs its job: `cp()` in a loop with a 20 ms
sleep (CPU-light) until the file `STOP` exists, then completes it. `PUSH` is a Redis URL
or `-`. `MODE` is `listen` (the default runtime: PostgreSQL LISTEN through psycopg,
unless `PUSH` is given) or `poll` (no listener: polls only). The launcher prints
`forked N`, waits for its children and exits
with the number of children that failed.

`Fleet` starts a launcher from a test or a benchmark, over freshly inserted jobs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.pool import NullPool

from dbcancel import Cancelled, Jobs, Status
from dbcancel._push import check_push
from dbcancel._sqla import SQLAlchemyBackend
from tests.models import Analysis

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__


class Fleet:
    """The launcher and its workers; `stop()` lets the jobs not cancelled complete."""

    def __init__(
        self, direct_url: str, url: str, workers: int, push: str | None, mode: str, interval: float
    ) -> None:
        direct = create_engine(direct_url, poolclass=NullPool)
        self.workers = workers
        with direct.begin() as conn:
            conn.execute(TABLE.delete())
            conn.execute(insert(TABLE), [{"status": "pending"} for _ in range(workers)])
            self.ids = list(conn.execute(select(TABLE.c.id).order_by(TABLE.c.id)).scalars())
        self.direct = direct
        self.stop_file = Path(tempfile.mkdtemp(prefix="dbcancel-fleet-")) / "stop"
        args = [url, push or "-", mode, str(interval), str(self.stop_file)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.fleet_launcher", *args, *map(str, self.ids)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )

    def count(self, status: Status) -> int:
        with self.direct.connect() as conn:
            query = select(func.count()).where(TABLE.c.status == status.value)
            return int(conn.execute(query).scalar_one())

    def wait_running(self, timeout: float) -> float:
        started = time.monotonic()
        while self.count(Status.IN_PROGRESS) < self.workers:
            assert self.process.poll() is None, "the launcher exited early"
            assert time.monotonic() - started < timeout, (
                f"{self.count(Status.IN_PROGRESS)} of {self.workers} jobs running after {timeout} s"
            )
            time.sleep(0.2)
        return time.monotonic() - started

    def stop(self, timeout: float) -> int:
        self.stop_file.touch()
        return self.process.wait(timeout)

    def close(self) -> None:
        self.stop_file.touch()
        if self.process.poll() is None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.direct.dispose()

    def rows(self) -> dict[int, Any]:
        with self.direct.connect() as conn:
            return {r.id: r for r in conn.execute(select(TABLE))}


def percentile(q: float, values: list[float]) -> float:
    """The `q` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cancel_all(jobs: Jobs, ids: list[int], rng: random.Random) -> list[int]:
    """Cancel `ids` a few milliseconds apart; the ids whose cancel returned True."""
    done = []
    for job in ids:
        if jobs.cancel(job, reason="fleet"):
            done.append(job)
        time.sleep(rng.uniform(0.0, 0.02))
    return done


class PollOnly(SQLAlchemyBackend):
    """The SQLAlchemy backend without a listener: the runtime polls only."""

    def listener(self) -> Any:
        return None


def prepare(url: str, push: str | None, mode: str, interval: float, job: int) -> Jobs:
    """The `Jobs` every child uses, warmed up before the fork: the table's identity
    resolved and the statements compiled once, the engine's connections closed (each
    child opens its own)."""
    engine = create_engine(
        url, connect_args={"prepare_threshold": None}, pool_size=1, max_overflow=1
    )
    if mode == "poll" and push is None:
        jobs = Jobs.from_backend(PollOnly(engine, Analysis), interval=interval)
    else:
        jobs = Jobs(engine, Analysis, interval=interval, push=push)
    jobs.status(job)
    jobs._backend.read_many([job])
    engine.dispose()
    return jobs


def child(jobs: Jobs, stop: str, job: int) -> int:
    try:
        with jobs.run(job) as cp:
            while not os.path.exists(stop):
                cp()
                time.sleep(0.02)
    except Cancelled:
        pass
    return 0


def main(argv: list[str]) -> int:
    url, push_arg, mode, interval, stop = argv[:5]
    push = None if push_arg == "-" else check_push(push_arg)
    if push is not None:
        import redis  # noqa: F401  (imported once, before forking)
    ids = [int(i) for i in argv[5:]]
    jobs = prepare(url, push, mode, float(interval), ids[0])
    pids = []
    for job in ids:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(jobs, stop, job)
            except BaseException as err:
                print(f"job {job}: {err!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        pids.append(pid)
    print(f"forked {len(pids)}", flush=True)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
