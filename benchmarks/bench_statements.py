"""Statements per second on the server for a fleet of 1,000 running jobs.

Run from the repository root::

    .venv/bin/python benchmarks/bench_statements.py                 # about 5-8 minutes
    .venv/bin/python benchmarks/bench_statements.py --processes 20  # fewer, scaled

1,000 jobs run in 100 worker processes (10 threads each), at a poll interval of 1 s,
with the default heartbeat (10 s). Each job's body does an item every 0.1 s and calls
`cp()` per item. Two fleets, one after the other, on one throwaway PostgreSQL 15
server (started here with `initdb` and `pg_ctl` on a free loopback port, with
`pg_stat_statements` loaded):

* **default**: `Jobs(engine, Model, interval=1)`, the watched mode: each process's
  runtime thread polls all the jobs of the table it runs in one statement per interval,
  listens for cancels, and beats the worker row;
* **per job**: the same with `watch=False` (threadless): each job's `cp()` polls its
  own row when a poll is due, and beats the worker row when due.

Once every job of a fleet runs, and after a settling pause, the server's counters are
read over a window (`--window`, 30 s): the number of statements executed
(`pg_stat_statements`, the sum of `calls` of every statement, BEGIN and COMMIT
included, the measuring queries excluded) and of transactions (`xact_commit +
xact_rollback` of the database in `pg_stat_database`). With fewer than 100 processes
(`--processes`), each still runs 10 jobs and the rates are also shown scaled to 100
processes (multiplied by 100 / processes).

Target: the default fleet at most 110 statements per second (about one poll per process
per interval, plus a beat per process per 10 s). The script prints a Markdown table and
exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import NullPool, create_engine, text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

from dbcancel import CancellableMixin  # noqa: E402
from tests.integration.servers import PostgresServer  # noqa: E402

JOBS_PER_PROCESS = 10
INTERVAL = 1.0
ITEM = 0.1
TARGET = 110.0

# One worker process: runs its jobs in threads until stdin closes (at once, if it closes
# before they all run: the parent gave up).
WORKER = """
import os, sys, threading
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from dbcancel import CancellableMixin, Jobs

class Base(DeclarativeBase):
    pass

class BenchJob(CancellableMixin, Base):
    __tablename__ = "bench_job"
    id: Mapped[int] = mapped_column(primary_key=True)

url, watch, first, count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
engine = create_engine(url, pool_size=3, max_overflow=0, pool_timeout=60)
jobs = Jobs(engine, BenchJob, interval=INTERVAL, watch=watch)
done = threading.Event()
ready = threading.Event()
entered = threading.Semaphore(0)

def watchdog():
    sys.stdin.read()
    if not ready.is_set():
        os._exit(3)
    done.set()

def work(job_id):
    with jobs.run(job_id) as cp:
        entered.release()
        while not done.is_set():
            cp()
            done.wait(ITEM)

threading.Thread(target=watchdog, daemon=True).start()
threads = [threading.Thread(target=work, args=(i,)) for i in range(first, first + count)]
for t in threads:
    t.start()
for _ in threads:
    entered.acquire()
ready.set()
print("ready", flush=True)
done.wait()
for t in threads:
    t.join(120)
engine.dispose()
""".replace("INTERVAL", repr(INTERVAL)).replace("ITEM", repr(ITEM))


class Base(DeclarativeBase):
    pass


class BenchJob(CancellableMixin, Base):
    """The job table of the fleet (the same model as the workers')."""

    __tablename__ = "bench_job"
    id: Mapped[int] = mapped_column(primary_key=True)


class BenchServer(PostgresServer):
    """The tests' throwaway PostgreSQL, with pg_stat_statements and room for the fleet."""

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=600 -c shared_buffers=64MB "
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all "
            "-c pg_stat_statements.track_utility=on"
        )
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o", options, "start")
        self.wait_until_up()


def counters(admin: Any) -> tuple[int, int, int]:
    """(statements, statements other than BEGIN/COMMIT/ROLLBACK, transactions) of the
    bench database so far; the measuring queries themselves are left out."""
    with admin.connect() as conn:
        statements, queries = conn.execute(
            text(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(calls) FILTER (WHERE NOT ("
                "upper(s.query) LIKE 'BEGIN%' OR upper(s.query) IN ('COMMIT', 'ROLLBACK'))), 0) "
                "FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'bench' "
                "AND s.query NOT LIKE '%pg_stat%'"
            )
        ).one()
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        xacts = conn.execute(
            text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'bench'")
        ).scalar_one()
    return int(statements), int(queries), int(xacts)


def by_statement(admin: Any) -> dict[str, int]:
    """Calls so far of each statement of the bench database (its text, one line)."""
    with admin.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT s.query, sum(s.calls) FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'bench' "
                "AND s.query NOT LIKE '%pg_stat%' GROUP BY s.query"
            )
        ).all()
    found: dict[str, int] = {}
    for query, n in rows:
        key = " ".join(query.split())[:90]
        found[key] = found.get(key, 0) + int(n)
    return found


def run_fleet(
    url: str, admin: Any, *, watch: bool, processes: int, window: float
) -> dict[str, float]:
    """Start the fleet, wait until every job runs, settle, measure, stop it."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM bench_job"))
        conn.execute(text("DELETE FROM dbcancel_worker"))
        total = processes * JOBS_PER_PROCESS
        conn.execute(
            text(
                "INSERT INTO bench_job (id, status) "
                "SELECT g, 'pending' FROM generate_series(1, :n) g"
            ),
            {"n": total},
        )
    engine.dispose()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.monotonic()
    fleet = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                "1" if watch else "0",
                str(1 + p * JOBS_PER_PROCESS),
                str(JOBS_PER_PROCESS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(processes)
    ]
    try:
        for proc in fleet:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line != "ready\n":
                raise RuntimeError(f"a worker did not start: {line!r}")
        ramp = time.monotonic() - started
        print(
            f"  {'default' if watch else 'per job'}: {processes} processes ready in "
            f"{ramp:.0f}s; settling",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(max(5.0, 2 * INTERVAL))  # past the first polls and beats of the late ones
        b0 = by_statement(admin)
        s0, q0, x0 = counters(admin)
        t0 = time.monotonic()
        time.sleep(window)
        s1, q1, x1 = counters(admin)
        elapsed = time.monotonic() - t0
        b1 = by_statement(admin)
        calls = sorted(((n - b0.get(q, 0), q) for q, n in b1.items()), reverse=True)
        for n, q in calls[:6]:
            print(f"    {n / elapsed:8.2f}/s  {q}", file=sys.stderr, flush=True)
    finally:
        for proc in fleet:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.close()
        deadline = time.monotonic() + 180
        for proc in fleet:
            try:
                proc.wait(max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "statements": (s1 - s0) / elapsed,
        "queries": (q1 - q0) / elapsed,
        "transactions": (x1 - x0) / elapsed,
        "ramp": ramp,
        "window": elapsed,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=100)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    if shutil.which("runuser") is None and os.geteuid() == 0:
        print("runuser is needed to start PostgreSQL as root", file=sys.stderr)
        return 2
    server = BenchServer()
    try:
        server.start()
        admin = create_engine(server.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE bench"))
            conn.execute(text("CREATE EXTENSION pg_stat_statements"))
            version = conn.execute(text("SHOW server_version")).scalar_one()
        url = server.url.rsplit("/", 1)[0] + "/bench"
        engine = create_engine(url, poolclass=NullPool)
        Base.metadata.create_all(engine)
        engine.dispose()
        load0 = os.getloadavg()[0]
        results = {}
        for watch in (True, False):
            results[watch] = run_fleet(
                url, admin, watch=watch, processes=args.processes, window=args.window
            )
        load1 = os.getloadavg()[0]
        admin.dispose()
    finally:
        server.remove()

    scale = 100 / args.processes
    jobs = args.processes * JOBS_PER_PROCESS
    print(
        f"Python {platform.python_version()}, PostgreSQL {version}, {args.processes} processes x "
        f"{JOBS_PER_PROCESS} jobs = {jobs} jobs, interval {INTERVAL:g} s, item {ITEM:g} s, "
        f"window {args.window:g} s, load average {load0:.1f} -> {load1:.1f}"
    )
    print()
    print(
        "| fleet | statements/s | of which not BEGIN/COMMIT/ROLLBACK | transactions/s "
        "| ready after |"
    )
    print("|---|---|---|---|---|")
    for watch, name in ((True, "default (watched)"), (False, "per job (watch=False)")):
        r = results[watch]
        print(
            f"| {name} | {r['statements']:.1f} | {r['queries']:.1f} | "
            f"{r['transactions']:.1f} | {r['ramp']:.0f} s |"
        )
    default = results[True]["queries"] * scale
    everything = results[True]["statements"] * scale
    ratio = results[False]["queries"] / max(results[True]["queries"], 1e-9)
    verdict = "met" if default <= TARGET else "MISSED"
    scaled = "" if scale == 1 else f", scaled x {scale:g}"
    print()
    print("| row | measured | target | verdict |")
    print("|---|---|---|---|")
    print(
        f"| default fleet, statements/s but BEGIN/COMMIT (100 processes{scaled}) "
        f"| {default:.1f} | <= {TARGET:g} | {verdict} |"
    )
    print(
        f"| default fleet, every statement/s (100 processes{scaled}) | {everything:.1f} | - | - |"
    )
    print(f"| per-job polling ÷ default (statements but BEGIN/COMMIT) | {ratio:.1f}x | - | - |")
    return 0 if verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
