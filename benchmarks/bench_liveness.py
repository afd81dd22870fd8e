"""Liveness benchmark of dbcancel: heartbeat row writes for 1,000 running jobs.

Run from the repository root::

    .venv/bin/python benchmarks/bench_liveness.py                  # about 1-2 minutes
    .venv/bin/python benchmarks/bench_liveness.py --quick          # under a minute
    .venv/bin/python benchmarks/bench_liveness.py --sqlite-only

For each database (SQLite file, and PostgreSQL and MariaDB when they answer), 1,000 jobs
run in 1 process and then in 10 processes (100 each), with a heartbeat period of 0.5 s.
Each worker process counts the rows it writes while its jobs run: its worker row's
beats, and any write of a job row. Beside it, in the same run, the reference: the
per-job heartbeat an earlier design used (one ``UPDATE ... WHERE id IN (...)`` of every
running job per period), whose row count is what the database writes.

Target: at most one row write per process per heartbeat period, whatever the number of
jobs. The script prints a Markdown table and exits 1 when a row misses its target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import (  # noqa: E402 - after the path is set for a run from anywhere
    Engine,
    String,
    create_engine,
    event,
    insert,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

from dbcancel import CancellableMixin, Jobs  # noqa: E402
from dbcancel.models import WORKER_TABLE  # noqa: E402

PERIOD = 0.5
JOBS = 1000
SERVERS = {
    "postgresql": os.environ.get(
        "DBCANCEL_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get("DBCANCEL_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def model(table: str) -> Any:
    class Base(DeclarativeBase):
        pass

    class Job(CancellableMixin, Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        owner: Mapped[str] = mapped_column(String(16), default="bench")

    return Job


def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 60})
    return create_engine(url, pool_size=5)


# -- a worker process ---------------------------------------------------------------------


def child(url: str, table: str, first: int, count: int, window: float) -> None:
    """Run jobs ``first .. first+count-1`` for ``window`` seconds; print the row writes."""
    engine = engine_for(url)
    job_model = model(table)
    jobs = Jobs(engine, job_model, interval=3600, heartbeat=PERIOD)
    worker_rows = job_rows = 0

    def count_writes(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal worker_rows, job_rows
        head = " ".join(statement.split()[:3]).upper()
        if head.startswith(("UPDATE", "INSERT")):
            if WORKER_TABLE.upper() in head:
                worker_rows += 1
            elif table.upper() in head:
                job_rows += 1

    with contextlib.ExitStack() as stack:
        for job in range(first, first + count):
            stack.enter_context(jobs.run(job))
        print("ready", flush=True)
        sys.stdin.readline()  # go
        event.listen(engine, "before_cursor_execute", count_writes)
        started = time.monotonic()
        time.sleep(window)  # the measured span: the heartbeat thread runs meanwhile
        elapsed = time.monotonic() - started
        event.remove(engine, "before_cursor_execute", count_writes)
    print(f"counted {worker_rows} {job_rows} {elapsed:.3f}", flush=True)
    engine.dispose()


# -- the parent ---------------------------------------------------------------------------


def measure(url: str, processes: int, window: float) -> tuple[float, float]:
    """Row writes per second by ``processes`` worker processes running 1,000 jobs."""
    table = f"bench_live_{uuid.uuid4().hex[:8]}"
    engine = engine_for(url)
    job_model = model(table)
    job_model.metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(insert(job_model.__table__), [{"owner": "bench"}] * JOBS)
            first_id = conn.execute(text(f"SELECT min(id) FROM {table}")).scalar_one()
        per = JOBS // processes
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    url,
                    table,
                    str(first_id + i * per),
                    str(per),
                    str(window),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a worker process failed to start: {line!r}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        worker_rows = job_rows = 0
        seconds = 0.0
        for proc in procs:
            assert proc.stdout is not None
            _, w, j, elapsed = proc.stdout.readline().split()
            worker_rows += int(w)
            job_rows += int(j)
            seconds = max(seconds, float(elapsed))
            proc.wait(60)
        if job_rows:
            raise RuntimeError(f"{job_rows} job rows were written while the jobs ran")
        return worker_rows / seconds, reference(engine, job_model, window)
    finally:
        own = [t for t in job_model.metadata.sorted_tables if t.name != WORKER_TABLE]
        job_model.metadata.drop_all(engine, tables=own)
        engine.dispose()


def reference(engine: Engine, job_model: Any, window: float) -> float:
    """Rows the per-job heartbeat of an earlier design writes per second for 1,000 jobs:
    one batched UPDATE of every running job's row per period, as its watcher sent."""
    t = job_model.__table__
    rows = 0
    started = time.monotonic()
    periods = max(2, int(window / PERIOD))
    for _ in range(periods):
        with engine.begin() as conn:
            now = conn.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
            rows += conn.execute(
                update(t).where(t.c.id.is_not(None)).values(heartbeat_at=_aware(now))
            ).rowcount
        time.sleep(PERIOD)
    return rows / (time.monotonic() - started)


def _aware(value: Any) -> Any:
    import datetime as dt

    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def reachable(url: str) -> bool:
    try:
        engine = create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        url, table, first, count, window = argv[1:]
        child(url, table, int(first), int(count), float(window))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows (smoke run)")
    parser.add_argument("--sqlite-only", action="store_true", help="no server databases")
    args = parser.parse_args(argv)
    window = 2.0 if args.quick else 5.0
    if args.quick:
        print("[bench] a quick (--quick) run: under a minute", file=sys.stderr, flush=True)
    else:
        print("[bench] a full run: about 1-2 minutes", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{Path(tmp) / 'live.db'}"}
        if not args.sqlite_only:
            urls.update({name: url for name, url in SERVERS.items() if reachable(url)})
        load = os.getloadavg()
        print("# dbcancel liveness benchmark\n")
        print(
            f"{JOBS:,} jobs running, heartbeat period {PERIOD} s, windows of {window} s; "
            f"load average at the start {load[0]:.2f}. Target: at most one row write per "
            "process per period. Reference, in the same run: the rows a per-job heartbeat "
            "(one batched UPDATE of every running job per period) writes.\n"
        )
        print("| row | measured | target | verdict |")
        print("|---|---|---|---|")
        missed = False
        labels = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mariadb": "MariaDB"}
        for name, url in urls.items():
            for processes in (1, 10):
                rate, ref = measure(url, processes, window)
                per = rate / processes * PERIOD
                ok = per <= 1.0
                missed |= not ok
                noun = "process" if processes == 1 else "processes"
                print(
                    f"| (j) heartbeat row writes, {JOBS:,} jobs in {processes} {noun}, "
                    f"{labels[name]} | {rate:.2f}/s ({per:.2f} per process per period); "
                    f"per-job heartbeat {ref:,.0f} rows/s ({ref / rate:,.0f}x) | <= 1 per "
                    f"process per period | {'met' if ok else 'MISSED'} |",
                    flush=True,
                )
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
