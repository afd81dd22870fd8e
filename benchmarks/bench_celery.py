"""Celery benchmark: dbcancel's ``cp()`` against ``is_aborted()``, and NOTIFY in and out of Celery.

Run from the repository root, with RabbitMQ and PostgreSQL on this machine::

    .venv/bin/python benchmarks/bench_celery.py            # full run, about a minute
    .venv/bin/python benchmarks/bench_celery.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_celery.py --pg-url postgresql+psycopg://user@host/db

A solo ``celery worker`` subprocess runs every kind of task; the results of the abortable
tasks live in PostgreSQL (Celery's database backend, ``db+postgresql+psycopg://...``),
which ``is_aborted()`` reads. Measured, side by side in one run:

* (a) the cost of one check inside a running task: ``cp()`` with no poll due, and
  ``self.is_aborted()`` (a query of the result backend per call);
* (b) the cross-process cancel latency of a CPU-bound task that polls every 0.5 s:
  dbcancel's ``cp()`` with ``watch=False`` (it re-reads its row when a poll is due, so
  that no NOTIFY can be what delivers the cancel) after ``jobs.cancel()``, and
  ``is_aborted()`` after ``AbortableAsyncResult.abort()``, each from this process, to
  the moment the task saw it;
* (c) the cross-process cancel latency through PostgreSQL NOTIFY, in the default
  watched mode at an interval of 10 s (so that only the notification can be fast): the
  same CPU-bound loop (``cp()`` per 1 ms item) as a Celery task of ``CeleryJobs``, and
  inside ``jobs.run()`` in a plain worker subprocess, outside Celery; beside them, the
  floor: a raw NOTIFY to a psycopg listener thread in a subprocess running the same loop.
  Latency runs from the return of the cancel (the commit that sends the NOTIFY) to the
  loop's exit; the three variants take turns in a shuffled order, three times ``--trials``
  rounds after one warm-up round that is not recorded. Target: the p95 in Celery at most
  1.2x the p95 outside Celery.

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
from importlib.metadata import version
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
NOTIFY_INTERVAL = 10.0
"""The interval of the (c) runs: far longer than any latency that NOTIFY delivers."""
NOTIFY_RATIO_TARGET = 1.2
"""(c) target: NOTIFY p95 in Celery at most this many times the same loop's outside Celery."""
NOTIFY_ROUNDS = 3
"""(c) runs this many times ``--trials`` cancels per variant."""
CANCEL_DELAY = (0.05, 0.25)
"""(c): seconds between the loop's ``started`` and the cancel, drawn uniformly."""
PLAIN_FLAG = "--child-plain"
"""argv[1] of the (c) subprocess running ``jobs.run()`` outside Celery (not a user option)."""
RAW_FLAG = "--child-raw"
"""argv[1] of the (c) subprocess with a bare psycopg LISTEN thread (not a user option)."""
TIMEOUT = 60.0

# The (c) variants.
CELERY = "celery"
PLAIN = "plain"
RAW = "raw"


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
    """Record the time of an event seen by a worker (CLOCK_MONOTONIC is system-wide on
    Linux: this process's reading compares with the benchmark's)."""
    (MARKS / name).write_text(repr(time.monotonic()))


def cpu_loop(cp: Checkpoint, key: str) -> None:
    """The (c) loop: ``cp()`` then 1 ms of CPU, until cancelled; marks its start and exit."""
    mark(f"started-{key}")
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            cp()
            busy_for(ITEM_SECONDS)
    finally:
        mark(f"seen-{key}")


if _WORKER_DB:
    app = make_app(_WORKER_DB)
    engine = create_engine(_WORKER_DB)
    # Threadless: cp() polls its own row every 0.5 s and nothing LISTENs, so a cancel
    # reaches the (b) task by its poll, as an abort reaches is_aborted().
    polled = CeleryJobs(app, engine, BenchJob, interval=INTERVAL, watch=False)
    # The default, watched mode: the (c) task's cancel arrives by NOTIFY.
    notified = CeleryJobs(app, engine, BenchJob, interval=NOTIFY_INTERVAL)
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

    @polled.task(name="bench.dbcancel_loop")
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

    @notified.task(name="bench.notify_loop")
    def notify_loop(cp: Checkpoint, job_id: int) -> None:
        """The (c) loop as a Celery task; the cancel arrives by NOTIFY."""
        cpu_loop(cp, str(job_id))


# -- the (c) subprocesses outside Celery --------------------------------------------------


def child_plain_main(argv: list[str]) -> int:
    """The (c) loop inside ``jobs.run()``, outside Celery, for each job id read on stdin."""
    engine = create_engine(argv[0])
    jobs = Jobs(engine, BenchJob, interval=NOTIFY_INTERVAL)
    print("ready", flush=True)
    for line in sys.stdin:
        with jobs.run(int(line)) as cp:
            cpu_loop(cp, line.strip())
    engine.dispose()
    return 0


def child_raw_main(argv: list[str]) -> int:
    """The (c) floor: a psycopg connection LISTENing in a thread, the same CPU-bound loop.

    For each payload read on stdin: mark ``started``, run 1 ms items until the listener
    thread has seen that payload, mark ``seen``.
    """
    from bench_core import RawListener

    conninfo, channel = argv
    listener = RawListener(conninfo, channel)
    print("ready", flush=True)
    for line in sys.stdin:
        key = line.strip()
        listener.expect(key)
        mark(f"started-{key}")
        try:
            while not listener.seen.is_set():
                busy_for(ITEM_SECONDS)
        finally:
            mark(f"seen-{key}")
    return 0  # the listener thread is a daemon blocked on the connection: exit with it


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


def child(flag: str, args: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[str]:
    """This script as a (c) subprocess, once it has said ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), flag, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise SystemExit(f"the {flag} subprocess did not start (said {line!r}); see its log")
    return proc


def stop_child(proc: subprocess.Popen[str] | None) -> None:
    """Close the subprocess's stdin (it exits when it has run its last job), or kill it."""
    if proc is None:
        return
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def summary(values: list[float]) -> str:
    """``p50 X / p95 Y ms (max Z; n=N)``."""
    return (
        f"p50 {pct(values, 0.5) * 1e3:.1f} / p95 {pct(values, 0.95) * 1e3:.1f} ms "
        f"(max {max(values) * 1e3:.1f}; n={len(values)})"
    )


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
    worker = plain = raw = None
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

        child_env = {**os.environ, "BENCH_CELERY_MARKS": str(marks)}
        child_env.pop("BENCH_CELERY_DB", None)
        child_log = open(marks / "children.log", "w")  # noqa: SIM115 - closed at the end
        raw_channel = f"bench_celery_raw_{token}"
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        plain = child(PLAIN_FLAG, [url], child_env, child_log)
        raw = child(RAW_FLAG, [conninfo, raw_channel], child_env, child_log)

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
                sent = time.monotonic()
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

        say(f"(c) cancel latency through NOTIFY: {NOTIFY_ROUNDS * trials} cancels per variant")
        notify: dict[str, list[float]] = {CELERY: [], PLAIN: [], RAW: []}
        assert plain.stdin is not None
        assert raw.stdin is not None
        # Three times the (b) trials: each is quick, and a p95 of ms needs the samples.
        for n in range(NOTIFY_ROUNDS * trials + 1):  # the first round is a warm-up
            for kind in rng.sample(sorted(notify), 3):
                if kind == RAW:
                    key = f"raw-{n}"
                    raw.stdin.write(key + "\n")
                else:
                    job_id = new_job()
                    key = str(job_id)
                    if kind == CELERY:
                        client.send_task("bench.notify_loop", args=[job_id])
                    else:
                        plain.stdin.write(key + "\n")
                until(lambda k=key: read_mark(marks, f"started-{k}"), f"{kind} to start")
                time.sleep(rng.uniform(*CANCEL_DELAY))
                if kind == RAW:
                    with engine.begin() as conn:
                        conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": raw_channel, "p": key})
                else:
                    jobs.cancel(job_id, reason="bench")
                sent = time.monotonic()
                seen = until(lambda k=key: read_mark(marks, f"seen-{k}"), f"{kind} to stop")
                if n:
                    notify[kind].append(seen - sent)
                if kind != RAW:
                    assert jobs.wait(job_id, timeout=TIMEOUT) is Status.CANCELLED
        client.close()
    finally:
        stop_child(plain)
        stop_child(raw)
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
        say(f"worker logs: {marks / 'worker.log'}, {marks / 'children.log'}")

    ratio = ab_cost / cp_cost
    db_p95, ab_p95 = pct(lat["dbcancel"], 0.95), pct(lat["abortable"], 0.95)
    target = INTERVAL + LATENCY_SLACK
    notify_ratio = pct(notify[CELERY], 0.95) / pct(notify[PLAIN], 0.95)
    p50_ratio = pct(notify[CELERY], 0.5) / pct(notify[PLAIN], 0.5)
    rows = [
        (
            "(a) `is_aborted()` ÷ `cp()`, per check inside a task",
            f"{ratio:,.0f}x ({ab_cost * 1e6:,.0f} µs vs {cp_cost * 1e9:.0f} ns)",
            f"≥ {RATIO_TARGET:,}x",
            ratio >= RATIO_TARGET,
        ),
        (
            f"(b) cancel latency p95, dbcancel `cp()`, polling (`watch=False`) every "
            f"{INTERVAL:g} s",
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
        (
            f"(c) cancel latency, NOTIFY, dbcancel on Celery (`CeleryJobs`, interval "
            f"{NOTIFY_INTERVAL:g} s)",
            summary(notify[CELERY]),
            "— (compared below)",
            None,
        ),
        (
            f"(c) cancel latency, NOTIFY, the same loop in `jobs.run()` outside Celery "
            f"(interval {NOTIFY_INTERVAL:g} s)",
            summary(notify[PLAIN]),
            "— (compared below)",
            None,
        ),
        (
            "(c) floor: raw NOTIFY → psycopg listener thread, the same loop",
            summary(notify[RAW]),
            "— (context)",
            None,
        ),
        (
            "(c) NOTIFY p95 in Celery ÷ outside Celery",
            f"{notify_ratio:.2f}x (p50 {p50_ratio:.2f}x)",
            f"≤ {NOTIFY_RATIO_TARGET:g}x",
            notify_ratio <= NOTIFY_RATIO_TARGET,
        ),
    ]
    header = (
        f"Python {platform.python_version()} · Celery {celery.__version__} · "
        f"dbcancel {dbcancel.__version__} · PostgreSQL {pg_version} · psycopg "
        f"{version('psycopg')} · solo worker · "
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
    if len(sys.argv) > 1 and sys.argv[1] == PLAIN_FLAG:
        sys.exit(child_plain_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == RAW_FLAG:
        sys.exit(child_raw_main(sys.argv[2:]))
    sys.exit(main())
