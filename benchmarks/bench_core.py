"""Core benchmark of dbcancel: checkpoint cost, naive re-reads and cancel latency.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py              # full run, a few minutes
    .venv/bin/python benchmarks/bench_core.py --quick      # smoke run, under a minute
    .venv/bin/python benchmarks/bench_core.py --sqlite-only
    .venv/bin/python benchmarks/bench_core.py --pg-url postgresql+psycopg://user@host/db

Everything is measured side by side in one run and every ratio is computed from numbers
of the same run, because the machines this runs on are noisy. The Markdown report goes to
stdout, progress to stderr. See ``benchmarks/README.md`` for what each row measures.

The benchmark creates its own uniquely named table (in a temporary SQLite file and in the
PostgreSQL database given by ``--pg-url``) and drops it at the end. It uses only the
standard library, SQLAlchemy, the database drivers and dbcancel itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import math
import os
import platform
import queue
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dbcancel
from dbcancel import CancellableMixin, Jobs, Status
from dbcancel.models import WORKER_TABLE

DEFAULT_PG_URL = os.environ.get(
    "DBCANCEL_BENCH_PG_URL",
    os.environ.get("DBCANCEL_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)
WORK_ITEM_SECONDS = 100e-6
"""CPU time of one work item in the latency runs: a CPU-bound worker that holds the GIL."""
INTERVALS = (0.05, 0.5)
"""The checkpoint intervals the latency rows are measured at."""
CHILD_FLAG = "--child-worker"
"""argv[1] of the subprocess that runs the cross-process worker (not a user option)."""
TIMEOUT = 60.0
"""Seconds to wait for any worker step before the benchmark gives up."""
NO_POLL_INTERVAL = 3600.0
"""The interval of the checkpoints timed in (a): no poll can fall due during the loops."""

# Row labels the summary table looks up.
MONO = "`time.monotonic()` in the loop body"
DIAG_DIRECT = "diagnostic: `cp.func()`, the closure `cp()` runs, called directly"
DIAG_PARTIAL = "diagnostic: `functools.partial(cp.func)()`, a plain partial"
CP = "`cp()`, threadless, no poll due (SQLite `Jobs`)"
DEFAULT_CP = "`cp()` in the default (watched) mode (SQLite `Jobs`)"
NAIVE_GET = "naive `expire_all()` + `session.get(...).status`"
NAIVE_SELECT = "naive `session.execute(select(status)...).scalar_one()`"


# -- settings and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run or the ``--quick`` smoke run."""

    quick: bool
    loop_number: int
    """Iterations per timed run of the (a) loops."""
    loop_repeat: int
    """Timed runs per (a) loop; the minimum is reported."""
    read_number: int
    """Checks per timed run of the (b) re-reads and the round-trip floors."""
    read_repeat: int
    """Timed runs per (b) variant."""
    trials: int
    """Cancels per (c) configuration."""

    @classmethod
    def make(cls, quick: bool, trials: int | None) -> Settings:
        """The settings of a full or quick run, with an optional trial count override."""
        if quick:
            return cls(True, 1_000_000, 3, 100, 3, trials or 8)
        return cls(False, 1_000_000, 7, 400, 7, trials or 40)


@dataclass
class Timing:
    """Seconds per iteration of one timed variant, one value per repeat."""

    label: str
    per_iter: list[float]

    @property
    def best(self) -> float:
        """The minimum over the repeats: the usual timeit estimator."""
        return min(self.per_iter)

    @property
    def median(self) -> float:
        """The median over the repeats, to show how noisy the run was."""
        return statistics.median(self.per_iter)


@dataclass
class Latency:
    """Cancel latencies (seconds) of one (c) configuration."""

    db: str
    where: str
    interval: float
    samples: list[float] = field(default_factory=list)
    cancel_calls: list[float] = field(default_factory=list)
    """How long each ``jobs.cancel()`` call took (seconds), for context."""

    def pct(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the samples."""
        return nearest_rank(self.samples, q)

    @property
    def target(self) -> float:
        """The p95 target: 2 ms in the same process, interval + 20 ms across processes."""
        return 0.002 if self.where == "same process" else self.interval + 0.020


def nearest_rank(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1): p95 of 40 values is the 38th smallest."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@dataclass
class Report:
    """Everything measured in one run, rendered as Markdown by :func:`render`."""

    settings: Settings
    seed: int
    header: dict[str, str] = field(default_factory=dict)
    work_item: Timing | None = None
    work_n: int = 0
    loops: dict[str, Timing] = field(default_factory=dict)
    polls_during_loops: int = 0
    reads: dict[str, dict[str, Timing]] = field(default_factory=dict)
    latencies: list[Latency] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- the job model and databases ------------------------------------------------------


def make_model(table_name: str) -> tuple[type[DeclarativeBase], type[Any]]:
    """A fresh declarative base and job model (``id`` + dbcancel's mixin) on ``table_name``."""

    class Base(DeclarativeBase):
        pass

    class Analysis(CancellableMixin, Base):
        __tablename__ = table_name

        id: Mapped[int] = mapped_column(primary_key=True)

    return Base, Analysis


def make_engine(url: str) -> Engine:
    """An engine as an application would create it; SQLite gets a generous busy timeout."""
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 30})
    return create_engine(url)


def add_job(engine: Engine, model: type[Any]) -> int:
    """Insert one pending job and return its id."""
    with engine.begin() as conn:
        key = conn.execute(insert(model)).inserted_primary_key
    assert key is not None
    return int(key[0])


@dataclass
class Database:
    """One database under test: its URL (the child workers connect with it), engine, model."""

    name: str
    url: str
    engine: Engine
    base: type[DeclarativeBase]
    model: type[Any]
    statements: list[int] = field(default_factory=lambda: [0])

    def count_statements(self) -> None:
        """Count every statement the engine sends, to prove that (a) polled nothing."""

        @event.listens_for(self.engine, "before_cursor_execute")
        def _count(*_: object) -> None:
            self.statements[0] += 1


@contextlib.contextmanager
def open_database(name: str, url: str, table: str) -> Iterator[Database]:
    """Create ``table`` in the database at ``url``; drop it (and dispose) on the way out."""
    base, model = make_model(table)
    engine = make_engine(url)
    try:
        base.metadata.create_all(engine)
    except Exception:
        engine.dispose()
        raise
    try:
        yield Database(name, url, engine, base, model)
    finally:
        engine.dispose()  # close every pooled connection before dropping the table
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Fail rather than hang if a forgotten session still holds the table.
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            # The benchmark's own tables: the worker table may serve other job tables.
            own = [t for t in base.metadata.sorted_tables if t.name != WORKER_TABLE]
            base.metadata.drop_all(conn, tables=own)
        engine.dispose()


# -- the raw NOTIFY floor ----------------------------------------------------------------


class RawListener:
    """A psycopg connection LISTENing on ``channel`` in a daemon thread of its own: the
    floor that dbcancel's NOTIFY latency is compared with (``bench_watch``,
    ``bench_celery``). ``expect(payload)`` arms ``seen`` for the next such payload."""

    def __init__(self, conninfo: str, channel: str) -> None:
        import psycopg
        from psycopg import sql

        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.seen = threading.Event()
        self._wanted: str | None = None
        threading.Thread(target=self._listen, name="bench-raw-listener", daemon=True).start()

    def expect(self, payload: str) -> None:
        """Clear ``seen``; set it again when ``payload`` arrives."""
        self.seen.clear()
        self._wanted = payload

    def _listen(self) -> None:
        for notify in self._conn.notifies():
            if notify.payload == self._wanted:
                self.seen.set()


# -- work items -------------------------------------------------------------------------


def busy(n: int) -> int:
    """A pure-Python busy loop: CPU work that holds the GIL for its whole duration."""
    acc = 0
    for i in range(n):
        acc += i
    return acc


def calibrate_work(target: float = WORK_ITEM_SECONDS) -> tuple[int, Timing]:
    """The ``busy()`` argument that takes about ``target`` seconds, and its timing."""
    n = 1000
    for _ in range(4):
        best = min(timeit.repeat(functools.partial(busy, n), number=1, repeat=50))
        n = max(1, round(n * target / best))
    runs = timeit.repeat(functools.partial(busy, n), number=1, repeat=200)
    return n, Timing(f"work item: `busy({n})`", runs)


# -- (a) the checkpoint's hot path --------------------------------------------------------


def time_round_robin(
    variants: dict[str, Callable[[int], float]], number: int, repeat: int, rng: random.Random
) -> dict[str, Timing]:
    """Run every variant ``repeat`` times, interleaved in a shuffled order each round.

    Each callable runs ``number`` iterations and returns the elapsed seconds. The garbage
    collector is off during each timed run, as in :mod:`timeit`.
    """
    results = {label: Timing(label, []) for label in variants}
    for _ in range(repeat):
        order = list(variants)
        rng.shuffle(order)
        for label in order:
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                elapsed = variants[label](number)
            finally:
                if was_enabled:
                    gc.enable()
            results[label].per_iter.append(elapsed / number)
    return results


def timeit_loop(stmt: str, setup: str = "pass", **names: Any) -> Callable[[int], float]:
    """A timeit loop of ``stmt``; ``names`` are its globals, ``setup`` may bind locals."""
    timer = timeit.Timer(stmt, setup, globals=dict(names))
    return timer.timeit


def measure_hot_path(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(a): ``cp()`` with no poll due, beside an empty loop and ``time.monotonic()`` loops."""
    s = report.settings
    with contextlib.ExitStack() as stack:
        variants: dict[str, Callable[[int], float]] = {
            "empty `for` loop": timeit_loop("pass"),
            MONO: timeit_loop("time.monotonic()", time=time),
            "`time.monotonic` bound to a local": timeit_loop(
                "monotonic()", "monotonic = time.monotonic", time=time
            ),
            "`threading.Event().is_set()`": timeit_loop(
                "ev.is_set()", "ev = threading.Event()", threading=threading
            ),
        }
        for db in dbs:
            jobs = Jobs(db.engine, db.model, interval=NO_POLL_INTERVAL, watch=False)
            cp = stack.enter_context(jobs.run(add_job(db.engine, db.model)))
            variants[f"`cp()`, threadless, no poll due ({db.name} `Jobs`)"] = timeit_loop(
                "cp()", "cp = the_checkpoint", the_checkpoint=cp
            )
            if db is dbs[0]:
                # The default mode: the watcher polls (not in these loops: its interval
                # is an hour, and SQLite has no listener that would poll at connect).
                default = Jobs(db.engine, db.model, interval=NO_POLL_INTERVAL)
                assert default.watch, "the default mode is the watched one"
                watched = stack.enter_context(default.run(add_job(db.engine, db.model)))
                variants[DEFAULT_CP] = timeit_loop(
                    "cp()", "cp = the_checkpoint", the_checkpoint=watched
                )
                # The contextvar form deep code uses; it finds the checkpoint entered last.
                variants["`dbcancel.checkpoint()`, no poll due"] = timeit_loop(
                    "dbcancel.checkpoint()", dbcancel=dbcancel
                )
                # Diagnostics: where cp()'s time goes. The same closure cp() runs, called
                # from Python directly, and through a plain (non-subclassed) partial.
                variants[DIAG_DIRECT] = timeit_loop("f()", "f = the_func", the_func=cp.func)
                variants[DIAG_PARTIAL] = timeit_loop(
                    "f()", "f = the_partial", the_partial=functools.partial(cp.func)
                )
        before = sum(db.statements[0] for db in dbs)
        report.loops = time_round_robin(variants, s.loop_number, s.loop_repeat, rng)
        report.polls_during_loops = sum(db.statements[0] for db in dbs) - before


# -- (b) naive re-reads and round-trip floors --------------------------------------------


def naive_get_loop(session: Session, model: type[Any], job_id: int) -> Callable[[int], float]:
    """The re-read apps write today: expire the identity map, ``session.get`` the row."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            session.expire_all()
            # Written as apps write it: no None check, the row is assumed to exist.
            if session.get(model, job_id).status == Status.CANCELLED:  # type: ignore[union-attr]
                break
        return time.perf_counter() - t0

    return run


def naive_select_loop(session: Session, model: type[Any], job_id: int) -> Callable[[int], float]:
    """The Core-style re-read: ``select(status)`` by id per item, built inline as apps do."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            status = session.execute(select(model.status).where(model.id == job_id)).scalar_one()
            if status == Status.CANCELLED:
                break
        return time.perf_counter() - t0

    return run


def poll_loop(cp: dbcancel.Checkpoint) -> Callable[[int], float]:
    """``cp.poll()``: the one re-read ``cp()`` does per interval when a poll is due."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            cp.poll()
        return time.perf_counter() - t0

    return run


def select_one_loop(cursor: Any) -> Callable[[int], float]:
    """``SELECT 1`` through a bare DB-API cursor: the round-trip floor of the driver."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return time.perf_counter() - t0

    return run


def measure_reads(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(b): naive per-item re-reads on each database, plus ``cp.poll()`` and ``SELECT 1``."""
    s = report.settings
    for db in dbs:
        job_id = add_job(db.engine, db.model)
        jobs = Jobs(db.engine, db.model, interval=NO_POLL_INTERVAL)
        with (
            Session(db.engine) as session,
            jobs.run(job_id) as cp,
            db.engine.connect() as raw_conn,
        ):
            driver_conn: Any = raw_conn.connection.driver_connection
            if db.name == "PostgreSQL":
                driver_conn.autocommit = True  # one round trip per SELECT 1, no BEGIN
            cursor = driver_conn.cursor()
            variants = {
                NAIVE_GET: naive_get_loop(session, db.model, job_id),
                NAIVE_SELECT: naive_select_loop(session, db.model, job_id),
                "`cp.poll()` (what `cp()` does once per interval)": poll_loop(cp),
                f"`SELECT 1`, bare {db.engine.driver} cursor (floor)": select_one_loop(cursor),
            }
            for run in variants.values():
                run(max(1, s.read_number // 10))  # warm caches, compile statements
            report.reads[db.name] = time_round_robin(variants, s.read_number, s.read_repeat, rng)
            cursor.close()
            if db.name == "PostgreSQL":
                driver_conn.autocommit = False


# -- (c) cancel latency -------------------------------------------------------------------


def worker_loop(jobs: Jobs, job_id: int, work_n: int, started: Callable[[], None]) -> float:
    """Run the job: ``cp()`` then one work item, until cancelled; the monotonic exit time."""
    exited = math.nan
    with jobs.run(job_id) as cp:
        started()
        try:
            while True:
                cp()
                busy(work_n)
        finally:
            exited = time.monotonic()
    return exited


def same_process_trial(
    db: Database, jobs: Jobs, work_n: int, interval: float, rng: random.Random
) -> tuple[float, float]:
    """One cancel of a job whose worker is a thread of this process.

    Returns the latency and how long the ``cancel()`` call itself took.
    """
    job_id = add_job(db.engine, db.model)
    started = threading.Event()
    exited: list[float] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            exited.append(worker_loop(jobs, job_id, work_n, started.set))
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            started.set()

    thread = threading.Thread(target=target, name=f"bench-worker-{job_id}", daemon=True)
    thread.start()
    if not started.wait(TIMEOUT) or errors:
        raise RuntimeError(f"the worker thread did not start: {errors}")
    time.sleep(rng.uniform(interval, 2 * interval))
    called_at = time.monotonic()
    jobs.cancel(job_id)
    cancelled_at = time.monotonic()
    thread.join(TIMEOUT)
    if thread.is_alive() or errors or not exited:
        raise RuntimeError(f"the worker thread did not stop after the cancel: {errors}")
    return exited[0] - cancelled_at, cancelled_at - called_at


def python_command(*args: str) -> list[str]:
    """``python [-W ...] args``: a child inherits this interpreter's warning filters."""
    return [sys.executable, *(f"-W{opt}" for opt in sys.warnoptions), *args]


class Child:
    """A subprocess driven line by line over its pipes (stderr is inherited).

    Shared by the three benchmark scripts: their workers, servers and listeners.
    """

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def expect(self, word: str, timeout: float = TIMEOUT) -> str:
        """The next line from the child, which must start with ``word``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.name} sent no {word!r} in {timeout}s") from None
        if line is None or not line.startswith(word):
            raise RuntimeError(f"the {self.name} sent {line!r}, expected {word!r}")
        return line

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()

    def close(self, terminate: bool = False) -> None:
        """Close stdin (or send SIGTERM first) and wait for the child; kill it if it hangs."""
        if terminate:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ChildWorker(Child):
    """A worker subprocess with its own engine, running the jobs it is sent."""

    def __init__(self, url: str, table: str, interval: float, work_n: int) -> None:
        args = [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG]
        args += [url, table, repr(interval), str(work_n)]
        super().__init__(args, "worker subprocess")
        self.expect("ready")

    def start(self, job_id: int) -> None:
        """Ask the child to run ``job_id``."""
        self.send(str(job_id))


def cross_process_trial(
    db: Database, jobs: Jobs, child: ChildWorker, interval: float, rng: random.Random
) -> tuple[float, float]:
    """One cancel, from this process, of a job running in ``child``.

    Returns the latency and how long the ``cancel()`` call itself took.
    """
    job_id = add_job(db.engine, db.model)
    child.start(job_id)
    child.expect("started")
    time.sleep(rng.uniform(interval, 2 * interval))
    called_at = time.monotonic()
    jobs.cancel(job_id)
    cancelled_at = time.monotonic()
    # CLOCK_MONOTONIC is system-wide on Linux: the child's reading compares with ours.
    exited = float(child.expect("exited").split()[1])
    return exited - cancelled_at, cancelled_at - called_at


def child_main(argv: list[str]) -> int:
    """The cross-process worker: runs each job id read from stdin until it is cancelled."""
    url, table, interval, work_n = argv[0], argv[1], float(argv[2]), int(argv[3])
    engine = make_engine(url)
    _, model = make_model(table)
    jobs = Jobs(engine, model, interval=interval)
    print("ready", flush=True)
    for line in sys.stdin:
        exited = worker_loop(jobs, int(line), work_n, lambda: print("started", flush=True))
        print(f"exited {exited!r}", flush=True)
    engine.dispose()
    return 0


def measure_latency(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(c): cancel latency, same process and cross process, at each interval."""
    trials = report.settings.trials
    for db in dbs:
        for interval in INTERVALS:
            jobs = Jobs(db.engine, db.model, interval=interval)
            same = Latency(db.name, "same process", interval)
            progress(f"(c) {db.name}, same process, interval {interval}s: {trials} trials")
            for _ in range(trials):
                latency, call = same_process_trial(db, jobs, report.work_n, interval, rng)
                same.samples.append(latency)
                same.cancel_calls.append(call)
            report.latencies.append(same)

            cross = Latency(db.name, "another process", interval)
            progress(f"(c) {db.name}, another process, interval {interval}s: {trials} trials")
            child = ChildWorker(db.url, db.model.__tablename__, interval, report.work_n)
            try:
                # One unrecorded trial: the child's first poll compiles its statement.
                cross_process_trial(db, jobs, child, interval, rng)
                for _ in range(trials):
                    latency, call = cross_process_trial(db, jobs, child, interval, rng)
                    cross.samples.append(latency)
                    cross.cancel_calls.append(call)
            finally:
                child.close()
            report.latencies.append(cross)


# -- rendering ---------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    """A duration in the unit that suits it: ns, µs or ms."""
    magnitude = abs(seconds)
    if magnitude < 1e-6:
        return f"{seconds * 1e9:.1f} ns"
    if magnitude < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def fmt_ms(seconds: float) -> str:
    """A latency in milliseconds."""
    return f"{seconds * 1e3:.2f}"


def fmt_ratio(value: float) -> str:
    """A ratio, with thousands separators once it is large."""
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def verdict(ok: bool) -> str:
    """``met`` or ``MISSED``."""
    return "met" if ok else "**MISSED**"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report_head(title: str, header: dict[str, str], warnings: list[str]) -> list[str]:
    """The opening lines of every benchmark's report: its title, the line describing
    the run (versions, machine, load) and its warnings."""
    out = [f"# dbcancel {title} benchmark", "", " · ".join(f"{k} {v}" for k, v in header.items())]
    out.append("")
    out += [f"> **Warning:** {w}" for w in warnings]
    if warnings:
        out.append("")
    return out


def render(report: Report) -> str:
    """The whole report as Markdown."""
    out = report_head("core", report.header, report.warnings)
    cp = report.loops[CP].best
    mono = report.loops[MONO].best
    default = report.loops[DEFAULT_CP].best
    rows = [
        [
            "(a) default-mode `cp()` ÷ `time.monotonic()` loop",
            f"{fmt_ratio(default / mono)} ({fmt_time(default)} vs {fmt_time(mono)})",
            "≤ 1x",
            verdict(default / mono <= 1.0),
        ],
        [
            "(a) threadless `cp()` ÷ `time.monotonic()` loop (no poll due)",
            f"{fmt_ratio(cp / mono)} ({fmt_time(cp)} vs {fmt_time(mono)})",
            "≤ 2x",
            verdict(cp / mono <= 2.0),
        ],
    ]
    for db_name, reads in report.reads.items():
        for label, short in ((NAIVE_GET, "`expire_all()`+`get`"), (NAIVE_SELECT, "`select`")):
            naive = reads[label].best
            pg = db_name == "PostgreSQL"
            rows.append(
                [
                    f"(b) naive re-read per item ({short}), {db_name}, ÷ `cp()`",
                    f"{fmt_ratio(naive / cp)} ({fmt_time(naive)} vs {fmt_time(cp)})",
                    "≥ 200x" if pg else "— (context)",
                    verdict(naive / cp >= 200) if pg else "—",
                ]
            )
    if "PostgreSQL" not in report.reads:
        rows.append(["(b) naive re-read on PostgreSQL", "not measured", "≥ 200x", "—"])
    for lat in report.latencies:
        p95 = lat.pct(0.95)
        rows.append(
            [
                f"(c) cancel latency p95, {lat.where}, {lat.db}, interval {lat.interval:g} s",
                f"{fmt_ms(p95)} ms (p50 {fmt_ms(lat.pct(0.5))}, max {fmt_ms(max(lat.samples))};"
                f" n={len(lat.samples)})",
                f"≤ {fmt_ms(lat.target)} ms",
                verdict(p95 <= lat.target),
            ]
        )
    for db_name, reads in report.reads.items():
        floor = next(t for label, t in reads.items() if label.startswith("`SELECT 1`"))
        rows.append(
            [
                f"floor: {floor.label.removesuffix(' (floor)')}, {db_name}",
                fmt_time(floor.best),
                "— (context)",
                "—",
            ]
        )
    out += table(["row", "measured", "target", "verdict"], rows)

    out += ["", "## (a) per-iteration cost of the loops", ""]
    out.append(
        f"timeit loops of {report.settings.loop_number:,} iterations, "
        f"{report.settings.loop_repeat} runs each, interleaved; min and median over the runs. "
        f"Statements sent during these loops (must be 0, no poll): {report.polls_during_loops}."
    )
    out.append("")
    out += table(
        ["loop body", "min ns/iter", "median ns/iter", "min ÷ `time.monotonic()` loop"],
        [
            [label, f"{t.best * 1e9:.1f}", f"{t.median * 1e9:.1f}", f"{t.best / mono:.2f}x"]
            for label, t in report.loops.items()
        ],
    )

    out += ["", "## (b) per-check cost of re-reading the row", ""]
    out.append(
        f"{report.settings.read_number} checks per timed run, {report.settings.read_repeat} runs "
        "each, interleaved; one long-lived `Session` (autobegin), as an app would hold it."
    )
    out.append("")
    read_rows = []
    for db_name, reads in report.reads.items():
        for label, t in reads.items():
            read_rows.append(
                [
                    db_name,
                    label,
                    fmt_time(t.best),
                    fmt_time(t.median),
                    fmt_ratio(t.best / cp),
                ]
            )
    out += table(["database", "check", "min", "median", "min ÷ `cp()` min"], read_rows)

    out += ["", "## (c) cancel latency, `cancel()` returned → worker loop exited (ms)", ""]
    assert report.work_item is not None
    out.append(
        f"Work item: `busy({report.work_n})`, a pure-Python loop holding the GIL, "
        f"{fmt_time(report.work_item.best)} min / {fmt_time(report.work_item.median)} median; "
        "`cp()` before each item. Cancel after a random delay in [interval, 2 * interval] "
        "from the worker's start. Percentiles are nearest-rank. A negative value means the "
        "worker's own poll saw the committed cancel before `cancel()` had returned."
    )
    out.append("")
    out += table(
        [
            "database",
            "worker",
            "interval",
            "n",
            "min",
            "p50",
            "p95",
            "max",
            "target p95",
            "`cancel()` call p50 / max",
        ],
        [
            [
                lat.db,
                lat.where,
                f"{lat.interval:g} s",
                str(len(lat.samples)),
                fmt_ms(min(lat.samples)),
                fmt_ms(lat.pct(0.5)),
                fmt_ms(lat.pct(0.95)),
                fmt_ms(max(lat.samples)),
                f"≤ {fmt_ms(lat.target)}",
                f"{fmt_ms(nearest_rank(lat.cancel_calls, 0.5))} / {fmt_ms(max(lat.cancel_calls))}",
            ]
            for lat in report.latencies
        ],
    )
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


EXIT_MISSED = 1
"""The exit status of a run that measured everything but missed a target row."""


def announce(quick: bool, full_minutes: str) -> None:
    """Say up front, on stderr, how long the run will take."""
    took = "under a minute" if quick else f"about {full_minutes} minutes"
    mode = "quick (--quick)" if quick else "full (--quick takes under a minute)"
    progress(f"a {mode} run: {took} on a 2-core machine; the table comes at the end")


def finish(rendered: str) -> int:
    """Print the report; return 0, or :data:`EXIT_MISSED` when a target row says MISSED."""
    print(rendered, end="")
    missed = [ln for ln in rendered.splitlines() if ln.startswith("| ") and "MISSED" in ln]
    if missed:
        progress(f"{len(missed)} target row(s) MISSED: exit status {EXIT_MISSED}")
        return EXIT_MISSED
    return 0


def version(dist: str) -> str:
    """The installed version of ``dist``, or ``-``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def source_fingerprint() -> str:
    """A short hash of dbcancel's source files, to tell which code was measured."""
    digest = hashlib.sha256()
    for path in sorted(Path(dbcancel.__file__).parent.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The git commit of the checkout dbcancel is imported from, and whether it is dirty."""
    repo = Path(dbcancel.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "dbcancel"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return f"{head} + uncommitted changes in dbcancel/" if dirty else head


def load_average() -> str:
    """The 1-minute load average: how busy the machine was (2 cores: above 2 is contended)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "-"


def describe(report: Report, dbs: list[Database]) -> None:
    """Fill the report's header line: versions, machine, date, mode."""
    h = report.header
    h["Python"] = platform.python_version()
    h["SQLAlchemy"] = sqlalchemy.__version__
    h["psycopg"] = version("psycopg")
    h["dbcancel"] = f"{dbcancel.__version__} (git {git_state()}, source {source_fingerprint()})"
    h["SQLite"] = sqlite3.sqlite_version
    for db in dbs:
        if db.name == "PostgreSQL":
            with db.engine.connect() as conn:
                pg_version = conn.execute(text("SHOW server_version")).scalar_one()
            h["PostgreSQL"] = str(pg_version).split()[0]
    h["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    h["machine"] = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    clocksource = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    with contextlib.suppress(OSError):
        h["clocksource"] = clocksource.read_text().strip()
    h["switch interval"] = f"{sys.getswitchinterval() * 1e3:g} ms"
    h["load avg at start"] = load_average()
    h["mode"] = "quick" if report.settings.quick else "full"
    h["seed"] = str(report.seed)


def open_databases(
    stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path, table_name: str
) -> list[Database] | None:
    """Open SQLite (in ``tmp``) and, unless --sqlite-only, PostgreSQL on ``stack``.

    None, after saying why on stderr, when PostgreSQL is unreachable. Shared by the
    benchmark scripts.
    """
    targets = [("SQLite", f"sqlite:///{tmp / 'bench.db'}")]
    if not args.sqlite_only:
        targets.append(("PostgreSQL", args.pg_url))
    dbs: list[Database] = []
    for name, url in targets:
        try:
            db = stack.enter_context(open_database(name, url, table_name))
        except OperationalError as err:
            shown = make_url(url).render_as_string(hide_password=True)
            print(
                f"{name} at {shown} is not reachable ({err.orig}); "
                "pass --pg-url URL or --sqlite-only",
                file=sys.stderr,
            )
            return None
        db.count_statements()
        dbs.append(db)
    return dbs


def parse_args(argv: list[str], description: str) -> argparse.Namespace:
    """The command line, shared by the benchmark scripts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and trials: a smoke run under ~60 s"
    )
    parser.add_argument(
        "--pg-url",
        default=DEFAULT_PG_URL,
        help="SQLAlchemy URL of the PostgreSQL database (default: %(default)s)",
    )
    parser.add_argument(
        "--sqlite-only", action="store_true", help="skip PostgreSQL; measure on SQLite only"
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="cancels per latency row (default 40, quick 8)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return child_main(argv[1:])
    args = parse_args(
        argv, "Measure dbcancel's checkpoint cost, naive re-reads and cancel latency."
    )
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    report = Report(Settings.make(args.quick, args.trials), seed)
    announce(args.quick, "3-4")
    table_name = f"dbcancel_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    fingerprint = source_fingerprint()

    with (
        tempfile.TemporaryDirectory(prefix="dbcancel-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        dbs = open_databases(stack, args, Path(tmp), table_name)
        if dbs is None:
            return 2
        describe(report, dbs)

        progress("calibrating the ~100 µs work item")
        report.work_n, report.work_item = calibrate_work()
        progress("(a) checkpoint hot path vs monotonic loops")
        measure_hot_path(report, dbs, rng)
        progress("(b) naive re-reads and round-trip floors")
        measure_reads(report, dbs, rng)
        measure_latency(report, dbs, rng)

    report.header["load avg at end"] = load_average()
    report.header["took"] = f"{time.monotonic() - started:.0f} s"
    if source_fingerprint() != fingerprint:
        report.warnings.append(
            "dbcancel's source files changed during this run: the numbers may mix versions."
        )
    return finish(render(report))


if __name__ == "__main__":
    sys.exit(main())
