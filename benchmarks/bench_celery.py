"""Celery benchmark: dbcancel's ``cp()`` against ``celery.contrib.abortable``'s ``is_aborted()``.

Run from the repository root, with RabbitMQ and PostgreSQL on this machine::

    .venv/bin/python benchmarks/bench_celery.py            # full run, about a minute
    .venv/bin/python benchmarks/bench_celery.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_celery.py --pg-url postgresql+psycopg://user@host/db

A solo ``celery worker`` subprocess runs both kinds of task; the results of the abortable
tasks live in PostgreSQL (Celery's database backend, ``db+postgresql+psycopg://...``),
which ``is_aborted()`` reads. Measured, side by side in one run:

* the cost of one check inside a running task: ``cp()`` with no poll due, and
  ``self.is_aborted()`` (a query of the result backend per call);
* the cross-process cancel latency of a CPU-bound task that checks at an interval of
  0.5 s: ``jobs.cancel()`` for dbcancel, ``AbortableAsyncResult.abort()`` for the
  abortable task, each from this process, to the moment the task saw it.

Everything lives in a PostgreSQL schema of its own, dropped at the end; the queue is
unique to the run. The report (Markdown) goes to stdout, progress to stderr; the exit
status is 1 when a target says MISSED, 2 when a service is unreachable.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import celery
from celery import Celery
from celery.contrib.abortable import AbortableAsyncResult, AbortableTask
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import dbcancel
from dbcancel import CancellableMixin, Checkpoint, Jobs, Status
from dbcancel.contrib.celery import CeleryJobs

DEFAULT_PG_URL = os.environ.get(
    "DBCANCEL_BENCH_PG_URL",
    os.environ.get("DBCANCEL_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)
BROKER = os.environ.get("DBCANCEL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
INTERVAL = 0.5
"""The checking interval of the latency runs, for both kinds of task."""
ITEM_SECONDS = 0.001
"""CPU time of one work item of the latency runs (a busy loop that holds the GIL)."""
RATIO_TARGET = 5_000
"""``is_aborted()`` must cost at least this many ``cp()`` calls."""
LATENCY_SLACK = 0.1
"""dbcancel's p95 target: the interval plus this many seconds."""
TIMEOUT = 60.0


class Base(DeclarativeBase):
    pass


class BenchJob(CancellableMixin, Base):
    __tablename__ = "bench_celery_job"
    id: Mapped[int] = mapped_column(primary_key=True)


# -- the worker's side: this module is also the app the worker imports ------------------

_WORKER_DB = os.environ.get("BENCH_CELERY_DB")
MARKS = Path(os.environ.get("BENCH_CELERY_MARKS", tempfile.gettempdir()))


def make_app(db_url: str) -> Celery:
    """The app both sides use: RabbitMQ, results in PostgreSQL through Celery's db backend."""
    backend = "db+" + db_url
    app = Celery("bench_celery", broker=BROKER, backend=backend)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "bench-celery"),
    )
    return app


def busy_for(seconds: float) -> None:
    """Hold the CPU (and the GIL) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def mark(name: str) -> None:
    """Record the wall-clock time of an event seen by the worker."""
    (MARKS / name).write_text(repr(time.time()))


if _WORKER_DB:
    app = make_app(_WORKER_DB)
    engine = create_engine(_WORKER_DB)
    cancellable = CeleryJobs(app, engine, BenchJob, interval=INTERVAL)
    idle = CeleryJobs(app, engine, BenchJob, interval=3600.0)

    @idle.task(name="bench.cp_cost")
    def cp_cost(cp: Checkpoint, job_id: int, n: int) -> float:
        """Seconds per ``cp()`` call, no poll due, inside a running task."""
        start = time.perf_counter()
        for _ in range(n):
            cp()
        return (time.perf_counter() - start) / n

    @app.task(name="bench.aborted_cost", bind=True, base=AbortableTask)
    def aborted_cost(self: Any, n: int) -> float:
        """Seconds per ``self.is_aborted()`` call inside a running task."""
        start = time.perf_counter()
        for _ in range(n):
            self.is_aborted()
        return (time.perf_counter() - start) / n

    @cancellable.task(name="bench.dbcancel_loop")
    def dbcancel_loop(cp: Checkpoint, job_id: int) -> None:
        """CPU-bound items, ``cp()`` per item; it polls the row every 0.5 s."""
        cp.on_cancel(lambda: mark(f"seen-{job_id}"))
        mark(f"started-{job_id}")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            cp()
            busy_for(ITEM_SECONDS)

    @app.task(name="bench.abortable_loop", bind=True, base=AbortableTask)
    def abortable_loop(self: Any, key: str) -> None:
        """CPU-bound items, ``is_aborted()`` every 0.5 s, as its cost asks."""
        mark(f"started-{key}")
        due = time.monotonic() + INTERVAL
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if time.monotonic() >= due:
                if self.is_aborted():
                    mark(f"seen-{key}")
                    return
                due = time.monotonic() + INTERVAL
            busy_for(ITEM_SECONDS)


# -- the benchmark's side -------------------------------------------------------------


def say(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def until(check: Any, what: str) -> Any:
    """Poll ``check`` until truthy; exit after ``TIMEOUT`` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not (value := check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)
    return value


def read_mark(marks: Path, name: str) -> float | None:
    """The time recorded by :func:`mark`, or None while there is none."""
    try:
        return float((marks / name).read_text())
    except (OSError, ValueError):
        return None


def pct(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values``."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--trials", type=int, default=None, help="cancels per kind")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    trials = args.trials or (5 if args.quick else 20)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    token = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    schema = f"bench_celery_{token}"
    admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
            pg_version = conn.execute(text("SHOW server_version")).scalar_one()
    except Exception as err:
        say(f"PostgreSQL is not reachable at {args.pg_url}: {err}")
        return 2
    url = (
        make_url(args.pg_url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    marks = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    queue = f"bench-celery-{token}"
    load_before = os.getloadavg()[0]
    worker = None
    try:
        engine = create_engine(url)
        Base.metadata.create_all(engine)
        jobs = Jobs(engine, BenchJob, interval=INTERVAL)
        os.environ["BENCH_CELERY_QUEUE"] = queue
        client = make_app(url)
        try:
            with client.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as err:
            say(f"RabbitMQ is not reachable at {BROKER}: {err}")
            return 2
        env = {
            **os.environ,
            "BENCH_CELERY_DB": url,
            "BENCH_CELERY_MARKS": str(marks),
            "BENCH_CELERY_QUEUE": queue,
        }
        worker_log = open(marks / "worker.log", "wb")  # noqa: SIM115 - closed at the end
        say(f"starting a solo worker; {trials} cancels per kind, about a minute (seed {seed})")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench_celery", "worker", "-P", "solo",
             "-Q", queue, "-n", f"bench-{token}@%h", "--without-gossip", "--without-mingle",
             "--loglevel=WARNING"],
            cwd=Path(__file__).resolve().parent,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

        def new_job() -> int:
            with engine.begin() as conn:
                key = conn.execute(insert(BenchJob)).inserted_primary_key
            assert key is not None
            return int(key[0])

        say("(a) cost of one check inside a running task")
        n_cp = 200_000 if args.quick else 2_000_000
        n_ab = 50 if args.quick else 300
        cp_runs = [
            client.send_task("bench.cp_cost", args=[new_job(), n_cp]).get(timeout=TIMEOUT)
            for _ in range(3)
        ]
        ab_runs = [
            client.send_task("bench.aborted_cost", args=[n_ab]).get(timeout=TIMEOUT)
            for _ in range(3)
        ]
        cp_cost, ab_cost = min(cp_runs), min(ab_runs)

        say("(b) cross-process cancel latency")
        lat: dict[str, list[float]] = {"dbcancel": [], "abortable": []}
        for _ in range(trials):
            for kind in rng.sample(sorted(lat), 2):
                if kind == "dbcancel":
                    job_id = new_job()
                    key = str(job_id)
                    client.send_task("bench.dbcancel_loop", args=[job_id])
                else:
                    key = uuid.uuid4().hex
                    result = client.send_task("bench.abortable_loop", args=[key])
                until(lambda k=key: read_mark(marks, f"started-{k}"), "the task to start")
                time.sleep(rng.uniform(0, INTERVAL))  # a random phase against the polls
                sent = time.time()
                if kind == "dbcancel":
                    jobs.cancel(job_id, reason="bench")
                else:
                    AbortableAsyncResult(result.id, app=client).abort()
                seen = until(lambda k=key: read_mark(marks, f"seen-{k}"), "the cancel")
                lat[kind].append(seen - sent)
                if kind == "dbcancel":
                    assert jobs.wait(job_id, timeout=TIMEOUT) is Status.CANCELLED
                else:
                    result.get(timeout=TIMEOUT)
        client.close()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
        say(f"worker log: {marks / 'worker.log'}")

    ratio = ab_cost / cp_cost
    db_p95, ab_p95 = pct(lat["dbcancel"], 0.95), pct(lat["abortable"], 0.95)
    target = INTERVAL + LATENCY_SLACK
    rows = [
        (
            "(a) `is_aborted()` ÷ `cp()`, per check inside a task",
            f"{ratio:,.0f}x ({ab_cost * 1e6:,.0f} µs vs {cp_cost * 1e9:.0f} ns)",
            f"≥ {RATIO_TARGET:,}x",
            ratio >= RATIO_TARGET,
        ),
        (
            f"(b) cancel latency p95, dbcancel `cp()`, interval {INTERVAL:g} s",
            f"{db_p95 * 1e3:.0f} ms (p50 {statistics.median(lat['dbcancel']) * 1e3:.0f}, "
            f"max {max(lat['dbcancel']) * 1e3:.0f}; n={len(lat['dbcancel'])})",
            f"≤ {target * 1e3:.0f} ms",
            db_p95 <= target,
        ),
        (
            f"(b) cancel latency p95, `abort()` + `is_aborted()` every {INTERVAL:g} s",
            f"{ab_p95 * 1e3:.0f} ms (p50 {statistics.median(lat['abortable']) * 1e3:.0f}, "
            f"max {max(lat['abortable']) * 1e3:.0f}; n={len(lat['abortable'])})",
            "— (context)",
            None,
        ),
    ]
    header = (
        f"Python {platform.python_version()} · Celery {celery.__version__} · "
        f"dbcancel {dbcancel.__version__} · PostgreSQL {pg_version} · solo worker · "
        f"load {load_before:.2f} → {os.getloadavg()[0]:.2f} · seed {seed}"
    )
    print("# dbcancel Celery benchmark\n")
    print(header + "\n")
    print("| row | measured | target | verdict |")
    print("|---|---|---|---|")
    for label, measured, goal, ok in rows:
        verdict = "—" if ok is None else ("met" if ok else "MISSED")
        print(f"| {label} | {measured} | {goal} | {verdict} |")
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
