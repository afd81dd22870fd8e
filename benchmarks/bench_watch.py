"""Watcher benchmark of dbcancel: ``Jobs(watch=True)`` against inline polling.

Run from the repository root (as a script: it imports its helpers from ``bench_core.py``
beside it)::

    .venv/bin/python benchmarks/bench_watch.py              # full run, a few minutes
    .venv/bin/python benchmarks/bench_watch.py --quick      # smoke run, under a minute
    .venv/bin/python benchmarks/bench_watch.py --sqlite-only
    .venv/bin/python benchmarks/bench_watch.py --pg-url postgresql+psycopg://user@host/db

Three measurements, side by side in one run:

* (g) status queries per second with 1, 100 and 1,000 jobs running in threads of this
  process, inline polling (``watch=False``: each checkpoint re-reads its own row once per
  interval) against the watcher (``watch=True``: one statement per interval for all of
  them), counted from SQLAlchemy's ``before_cursor_execute`` events;
* (h) cancel latency from another process with PostgreSQL NOTIFY (``watch=True`` at a
  10 s interval, so that polling cannot be what delivers it), beside the raw NOTIFY round
  trip to a plain psycopg listener thread in a CPU-bound process: the floor;
* (i) the cost of ``cp()`` in watcher mode against a loop calling an empty bound method.

The Markdown report goes to stdout, progress to stderr. See ``benchmarks/README.md`` for
what each row measures. The benchmark creates its own uniquely named table (in a temporary
SQLite file and in the PostgreSQL database given by ``--pg-url``) and drops it at the end.
It uses only the standard library, SQLAlchemy, the database drivers and dbcancel itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_core import (
    MONO,
    NO_POLL_INTERVAL,
    Child,
    Database,
    RawListener,
    Timing,
    add_job,
    announce,
    busy,
    calibrate_work,
    describe,
    finish,
    fmt_ms,
    fmt_ratio,
    fmt_time,
    load_average,
    make_engine,
    make_model,
    nearest_rank,
    open_databases,
    parse_args,
    progress,
    python_command,
    report_head,
    source_fingerprint,
    table,
    time_round_robin,
    timeit_loop,
    verdict,
    worker_loop,
)
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.engine import make_url

from dbcancel import Jobs, Status

POLL_INTERVAL = 0.5
"""The checkpoint interval of the (g) rows."""
JOB_COUNTS = (1, 100, 1000)
"""How many jobs run at once in the (g) rows."""
CALL_EVERY = 0.1
"""Seconds each (g) job thread sleeps between two ``cp()`` calls (1,000 threads that woke
every 10 ms would keep both cores busy with wake-ups alone)."""
WATCHER_TARGET = 2.0
"""(g) target: the watcher sends at most this many status queries per interval in total."""
NOTIFY_INTERVAL = 10.0
"""The interval of the (h) watcher: far longer than any latency that NOTIFY delivers."""
NOTIFY_TARGET = 0.100
"""(h) target: p95 well under one second; the verdict uses 100 ms."""
WAIT_TARGET = 0.100
"""(k): a remote ``wait()`` returns within this of the worker's end (p95)."""
HOT_TARGET = 1.5
"""(i) target: watcher-mode ``cp()`` at most 1.5x a loop calling an empty bound method."""
CANCEL_DELAY = (0.05, 0.25)
"""(h): seconds between the worker's ``started`` and the cancel, drawn uniformly."""
WATCH_FLAG = "--child-watch"
"""argv[1] of the (h) subprocess that runs jobs with ``Jobs(watch=True)`` (not a user option)."""
RAW_FLAG = "--child-raw-listen"
"""argv[1] of the (h) subprocess with a bare psycopg LISTEN thread (not a user option)."""
TIMEOUT = 60.0
"""Seconds to wait for any step before the benchmark gives up."""

# Labels.
INLINE = "inline"
WATCHER = "watcher"
BOUND = "`obj.method()`, an empty bound method"
EVENT = "`threading.Event().is_set()`"
DIAG_GETITEM = "diagnostic: `cp.func(*cp.args)`, the flag's `__getitem__` called directly"
RAW = "raw NOTIFY → psycopg listener thread → `Event`"
WATCHED = "`jobs.cancel()` → `Jobs(watch=True)` watcher"


def watch_cp_label(db: str) -> str:
    """The (i) label of a watcher-mode checkpoint on ``db``."""
    return f"`cp()`, watcher mode ({db} `Jobs(watch=True)`)"


def inline_cp_label(db: str) -> str:
    """The (i) label of an inline checkpoint on ``db`` with no poll due."""
    return f"`cp()`, inline mode, no poll due ({db} `Jobs`)"


# -- settings and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run or the ``--quick`` smoke run."""

    quick: bool
    window: float
    """Seconds of the (g) counting window."""
    warmup: float
    """Seconds between the last (g) job starting and the window opening."""
    trials: int
    """Cancels per (h) variant."""
    loop_number: int
    """Iterations per timed run of the (i) loops."""
    loop_repeat: int
    """Timed runs per (i) loop; the minimum is reported."""

    @classmethod
    def make(cls, quick: bool, trials: int | None) -> Settings:
        """The settings of a full or quick run, with an optional trial count override."""
        if quick:
            return cls(True, 2.0, POLL_INTERVAL, trials or 8, 1_000_000, 3)
        return cls(False, 10.0, 2 * POLL_INTERVAL, trials or 40, 1_000_000, 7)


@dataclass
class Rate:
    """What one (g) configuration sent to the database during its window."""

    db: str
    jobs: int
    mode: str
    seconds: float
    selects: int
    """SELECTs reading the job table."""
    returning: int
    """``UPDATE <job table> ... RETURNING``: the watcher's heartbeat that reads the rows."""
    beats: int
    """``UPDATE <job table> SET heartbeat_at`` without RETURNING (followed by a SELECT)."""
    other: int
    """Any other statement."""
    polls: int
    """The ``jobs.stats().polls`` delta over the window (one per poll, batch or not)."""
    cpu: float
    """CPU seconds of this process (all threads) over the window."""
    started_in: float
    """Seconds it took to start the jobs (context)."""
    cycle: float | None
    """Watcher: mean seconds between two of its status queries in the window."""

    @property
    def status_queries(self) -> int:
        """Statements that read job status: the SELECTs and the UPDATE ... RETURNING."""
        return self.selects + self.returning

    @property
    def per_second(self) -> float:
        """Status queries per second, all jobs together."""
        return self.status_queries / self.seconds

    @property
    def per_interval(self) -> float:
        """Status queries per poll interval, all jobs together."""
        return self.per_second * POLL_INTERVAL


@dataclass
class Trial:
    """One (h) cancel."""

    latency: float
    call: float
    """How long the cancel (or the NOTIFY transaction) took, seconds."""
    polls: int = 0
    notifications: int = 0
    listening: bool = False
    wait_lag: float | None = None
    """(k): seconds from the worker's loop exit to this process's ``wait()`` returning."""


@dataclass
class Report:
    """Everything measured in one run, rendered as Markdown by :func:`render`."""

    settings: Settings
    seed: int
    header: dict[str, str] = field(default_factory=dict)
    rates: list[Rate] = field(default_factory=list)
    dbs: list[str] = field(default_factory=list)
    work_item: Timing | None = None
    work_n: int = 0
    notify: dict[str, list[Trial]] = field(default_factory=dict)
    channel: str = ""
    loops: dict[str, Timing] = field(default_factory=dict)
    statements_during_loops: int = 0
    warnings: list[str] = field(default_factory=list)


# -- (g) status queries per second ---------------------------------------------------------


class StatusQueries:
    """Counts, by kind, the statements an engine sends that touch the job table."""

    KINDS = ("selects", "returning", "beats", "other")

    def __init__(self, engine: Engine, table_name: str) -> None:
        name = rf"[`\"]?{re.escape(table_name)}[`\"]?"
        self._select = re.compile(rf"^\s*SELECT\b.*\bFROM\s+{name}(\s|$)", re.I | re.S)
        self._update = re.compile(rf"^\s*UPDATE\s+{name}\s", re.I)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KINDS, 0)
        self._times: list[float] = []
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        statement: str = args[2]
        if self._select.match(statement):
            kind = "selects"
        elif self._update.match(statement) and "heartbeat_at" in statement:
            kind = "returning" if re.search(r"\bRETURNING\b", statement, re.I) else "beats"
        else:
            kind = "other"
        now = time.monotonic()
        with self._lock:
            self._counts[kind] += 1
            if kind in ("selects", "returning"):
                self._times.append(now)

    def snapshot(self) -> dict[str, int]:
        """The counts so far."""
        with self._lock:
            return dict(self._counts)

    def take_times(self) -> list[float]:
        """The ``time.monotonic()`` readings of the status queries since the last call."""
        with self._lock:
            times, self._times = self._times, []
            return times


def add_jobs(db: Database, n: int) -> list[int]:
    """Insert ``n`` pending jobs in one statement; their ids."""
    with db.engine.begin() as conn:
        result = conn.execute(
            insert(db.model).returning(db.model.id), [{"status": Status.PENDING}] * n
        )
        return [int(i) for i in result.scalars()]


class JobThreads:
    """One thread per job: ``with jobs.run(id) as cp``, then ``cp()`` every CALL_EVERY s."""

    def __init__(self, jobs: Jobs, ids: list[int]) -> None:
        self.stop = False
        self.errors: list[BaseException] = []
        self._started = threading.Semaphore(0)
        self._threads = [
            threading.Thread(target=self._run, args=(jobs, i), name=f"bench-job-{i}", daemon=True)
            for i in ids
        ]
        for thread in self._threads:
            thread.start()
        for _ in ids:
            if not self._started.acquire(timeout=TIMEOUT):
                self.stop = True
                raise RuntimeError("the job threads did not start")
        if self.errors:
            self.stop = True
            raise RuntimeError(f"job threads failed to start: {self.errors[:3]}")

    def _run(self, jobs: Jobs, job_id: int) -> None:
        try:
            with jobs.run(job_id) as cp:
                self._started.release()
                while not self.stop:
                    cp()
                    time.sleep(CALL_EVERY)
        except BaseException as err:  # reported by the main thread
            self.errors.append(err)
            self._started.release()

    def join(self) -> None:
        """Let every job end (completed) and wait for its thread."""
        self.stop = True
        deadline = time.monotonic() + TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop")
        if self.errors:
            raise RuntimeError(f"job threads failed: {self.errors[:3]}")


def measure_rate(db: Database, counter: StatusQueries, n: int, mode: str, s: Settings) -> Rate:
    """Run ``n`` jobs in ``mode``; count what reaches the database during the window."""
    jobs = Jobs(db.engine, db.model, interval=POLL_INTERVAL, watch=mode == WATCHER)
    ids = add_jobs(db, n)
    t0 = time.monotonic()
    threads = JobThreads(jobs, ids)
    started_in = time.monotonic() - t0
    try:
        time.sleep(s.warmup)  # the first polls are due, the watcher's thread runs
        counts0, polls0 = counter.snapshot(), jobs.stats().polls
        counter.take_times()
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(s.window)
        counts1, polls1 = counter.snapshot(), jobs.stats().polls
        cpu1, wall1 = time.process_time(), time.monotonic()
        times = counter.take_times()
    finally:
        threads.join()
    delta = {k: counts1[k] - counts0[k] for k in StatusQueries.KINDS}
    cycle = None
    if mode == WATCHER and len(times) >= 2:
        cycle = (times[-1] - times[0]) / (len(times) - 1)
    return Rate(
        db=db.name,
        jobs=n,
        mode=mode,
        seconds=wall1 - wall0,
        polls=polls1 - polls0,
        cpu=cpu1 - cpu0,
        started_in=started_in,
        cycle=cycle,
        **delta,
    )


def measure_rates(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(g): inline polling against the watcher, for each job count, on each database."""
    for db in dbs:
        counter = StatusQueries(db.engine, db.model.__tablename__)
        for n in JOB_COUNTS:
            modes = [INLINE, WATCHER]
            rng.shuffle(modes)
            for mode in modes:
                progress(f"(g) {db.name}, {n} jobs, {mode}: {report.settings.window:g} s window")
                rate = measure_rate(db, counter, n, mode, report.settings)
                report.rates.append(rate)
                if rate.seconds > 1.2 * report.settings.window:
                    report.warnings.append(
                        f"the (g) window of {db.name}, {n} jobs, {mode} lasted "
                        f"{rate.seconds:.2f} s instead of {report.settings.window:g} s: this "
                        "process was starved of CPU (see its CPU s/s and the load average)."
                    )


# -- (h) cancel latency with NOTIFY -----------------------------------------------------------


def this_script(name: str, *args: str) -> Child:
    """A child running this script with ``args``, once it has said ``ready``."""
    child = Child(python_command(str(Path(__file__).resolve()), *args), name)
    child.expect("ready")
    return child


def child_watch_main(argv: list[str]) -> int:
    """The (h) worker with ``Jobs(watch=True)``: runs each job id read on stdin until cancelled.

    Prints ``exited MONOTONIC POLLS NOTIFICATIONS LISTENING`` per job, the counters being
    the ``jobs.stats()`` deltas over the job.
    """
    url, table_name, interval, work_n = argv[0], argv[1], float(argv[2]), int(argv[3])
    engine = make_engine(url)
    _, model = make_model(table_name)
    jobs = Jobs(engine, model, interval=interval, watch=True)
    print("ready", flush=True)
    for line in sys.stdin:
        before = jobs.stats()
        exited = worker_loop(jobs, int(line), work_n, lambda: print("started", flush=True))
        after = jobs.stats()
        polls = after.polls - before.polls
        notifications = after.notifications - before.notifications
        print(f"exited {exited!r} {polls} {notifications} {int(after.listening)}", flush=True)
    engine.dispose()
    return 0


def child_raw_main(argv: list[str]) -> int:
    """The (h) floor: a plain psycopg connection LISTENing in a thread, a CPU-bound loop.

    For each payload read on stdin: clear the event, print ``started``, run work items
    until the listener thread has seen that payload, print ``exited MONOTONIC``.
    """
    conninfo, channel, work_n = argv[0], argv[1], int(argv[2])
    listener = RawListener(conninfo, channel)
    print("ready", flush=True)
    for line in sys.stdin:
        listener.expect(line.strip())
        print("started", flush=True)
        try:
            while not listener.seen.is_set():
                busy(work_n)
        finally:
            exited = time.monotonic()
        print(f"exited {exited!r}", flush=True)
    return 0  # the listener thread is a daemon blocked on the connection: exit with it


def watch_trial(db: Database, jobs: Jobs, child: Child, rng: random.Random) -> Trial:
    """One ``jobs.cancel()`` of a job running in the watching child."""
    job_id = add_job(db.engine, db.model)
    child.send(str(job_id))
    child.expect("started")
    time.sleep(rng.uniform(*CANCEL_DELAY))
    called_at = time.monotonic()
    jobs.cancel(job_id)
    cancelled_at = time.monotonic()
    # CLOCK_MONOTONIC is system-wide on Linux: the child's reading compares with ours.
    # (k) The cancel-then-delete flow: wait until the worker has really stopped. The
    # worker's interval and ours are 10 s: only its end's notification returns this soon.
    jobs.wait(job_id, timeout=NOTIFY_INTERVAL * 2 + TIMEOUT)
    returned_at = time.monotonic()
    _, exited, polls, notifications, listening = child.expect(
        "exited", NOTIFY_INTERVAL * 2 + TIMEOUT
    ).split()
    return Trial(
        float(exited) - cancelled_at,
        cancelled_at - called_at,
        int(polls),
        int(notifications),
        listening == "1",
        returned_at - float(exited),
    )


def raw_trial(db: Database, channel: str, child: Child, rng: random.Random, n: int) -> Trial:
    """One NOTIFY, committed from this process, to the raw listening child."""
    payload = f"raw-{n}"
    child.send(payload)
    child.expect("started")
    time.sleep(rng.uniform(*CANCEL_DELAY))
    called_at = time.monotonic()
    with db.engine.begin() as conn:
        conn.execute(select(func.pg_notify(channel, payload)))
    committed_at = time.monotonic()
    exited = float(child.expect("exited").split()[1])
    return Trial(exited - committed_at, committed_at - called_at)


def measure_notify(report: Report, db: Database, rng: random.Random) -> None:
    """(h): cancel latency through NOTIFY against the raw NOTIFY round trip, interleaved."""
    table_name = db.model.__tablename__
    report.channel = Jobs(db.engine, db.model)._backend.channel  # named in the report only
    raw_channel = f"dbcancel_bench_raw_{os.getpid()}"
    conninfo = make_url(db.url).set(drivername="postgresql").render_as_string(False)
    jobs = Jobs(db.engine, db.model, interval=NOTIFY_INTERVAL)
    trials = report.settings.trials
    progress(f"(h) PostgreSQL NOTIFY: {trials} cancels per variant, interleaved")
    work = str(report.work_n)
    interval = repr(NOTIFY_INTERVAL)
    watch_child = this_script("watcher", WATCH_FLAG, db.url, table_name, interval, work)
    try:
        raw_child = this_script("raw listener", RAW_FLAG, conninfo, raw_channel, work)
        try:
            results: dict[str, list[Trial]] = {WATCHED: [], RAW: []}
            for n in range(trials + 1):  # the first round is a warm-up, not recorded
                order = [WATCHED, RAW]
                rng.shuffle(order)
                for variant in order:
                    if variant == WATCHED:
                        trial = watch_trial(db, jobs, watch_child, rng)
                    else:
                        trial = raw_trial(db, raw_channel, raw_child, rng, n)
                    if n:
                        results[variant].append(trial)
            report.notify = results
        finally:
            raw_child.close()
    finally:
        watch_child.close()


# -- (i) the watcher-mode checkpoint's hot path ---------------------------------------------


class Plain:
    """An object with an empty method: the reference call of (i)."""

    def method(self) -> None:
        pass


def measure_hot_path(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(i): ``cp()`` in watcher mode, beside an empty bound method call and other loops."""
    s = report.settings
    with contextlib.ExitStack() as stack:
        variants: dict[str, Callable[[int], float]] = {
            "empty `for` loop": timeit_loop("pass"),
            MONO: timeit_loop("time.monotonic()", time=time),
            BOUND: timeit_loop("obj.method()", "obj = the_obj", the_obj=Plain()),
            EVENT: timeit_loop("ev.is_set()", "ev = threading.Event()", threading=threading),
        }
        for db in dbs:
            watch_jobs = Jobs(db.engine, db.model, interval=NO_POLL_INTERVAL, watch=True)
            cp = stack.enter_context(watch_jobs.run(add_job(db.engine, db.model)))
            variants[watch_cp_label(db.name)] = timeit_loop(
                "cp()", "cp = the_checkpoint", the_checkpoint=cp
            )
            if db is dbs[0]:
                variants[DIAG_GETITEM] = timeit_loop(
                    "f(k)", "f = the_func; k = the_key", the_func=cp.func, the_key=cp.args[0]
                )
            inline_jobs = Jobs(db.engine, db.model, interval=NO_POLL_INTERVAL, watch=False)
            inline_cp = stack.enter_context(inline_jobs.run(add_job(db.engine, db.model)))
            variants[inline_cp_label(db.name)] = timeit_loop(
                "cp()", "cp = the_checkpoint", the_checkpoint=inline_cp
            )
        time.sleep(0.2)  # let the watchers take in their jobs (and connect their listener)
        before = sum(db.statements[0] for db in dbs)
        report.loops = time_round_robin(variants, s.loop_number, s.loop_repeat, rng)
        report.statements_during_loops = sum(db.statements[0] for db in dbs) - before


# -- rendering ---------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    """Queries per second, with a precision that suits the magnitude."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_factor(value: float) -> str:
    """A large ratio without decimals (``979x``), a small one with two (``1.33x``)."""
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


def fmt_small(value: float) -> str:
    """A small positive number (per-job rates) with three significant digits."""
    return f"{value:.3g}"


def rate_of(report: Report, db: str, n: int, mode: str) -> Rate:
    """The (g) result of one configuration."""
    return next(r for r in report.rates if (r.db, r.jobs, r.mode) == (db, n, mode))


def latency_summary(trials: list[Trial]) -> str:
    """``p50 X / p95 Y ms (max Z; n=N)``."""
    samples = [t.latency for t in trials]
    return (
        f"p50 {fmt_ms(nearest_rank(samples, 0.5))} / p95 {fmt_ms(nearest_rank(samples, 0.95))} "
        f"ms (max {fmt_ms(max(samples))}; n={len(samples)})"
    )


def by_notify(trials: list[Trial]) -> int:
    """Trials the watcher saw through a notification, not through its 10 s poll."""
    return sum(1 for t in trials if t.notifications and t.latency < NOTIFY_INTERVAL / 2)


def summary_rows(report: Report) -> list[list[str]]:
    """The rows of the summary table."""
    rows: list[list[str]] = []
    for db in report.dbs:
        for n in JOB_COUNTS:
            inline = rate_of(report, db, n, INLINE)
            watcher = rate_of(report, db, n, WATCHER)
            ratio = inline.per_second / watcher.per_second if watcher.per_second else float("inf")
            rows.append(
                [
                    f"(g) status queries/s, {n:,} running job{'s' if n > 1 else ''}, {db}, "
                    f"interval {POLL_INTERVAL:g} s: inline vs watcher",
                    f"inline {fmt_rate(inline.per_second)}/s ({fmt_small(inline.per_second / n)}"
                    f" per job) vs watcher {fmt_rate(watcher.per_second)}/s "
                    f"({fmt_small(watcher.per_second / n)} per job): inline ÷ watcher "
                    f"{fmt_factor(ratio)}; watcher {watcher.per_interval:.2f} per interval",
                    f"watcher ≤ {WATCHER_TARGET:g} per interval",
                    verdict(watcher.per_interval <= WATCHER_TARGET),
                ]
            )
    if report.notify:
        watched, raw = report.notify[WATCHED], report.notify[RAW]
        p95 = nearest_rank([t.latency for t in watched], 0.95)
        rows.append(
            [
                "(h) cancel latency, another process, PostgreSQL NOTIFY, `Jobs(watch=True)`, "
                f"interval {NOTIFY_INTERVAL:g} s",
                f"{latency_summary(watched)}; seen through NOTIFY in "
                f"{by_notify(watched)} of {len(watched)}",
                f"p95 ≤ {fmt_ms(NOTIFY_TARGET)} ms (well under 1 s)",
                verdict(p95 <= NOTIFY_TARGET),
            ]
        )
        rows.append(
            [
                "(h) floor: raw NOTIFY round trip to a psycopg listener thread, CPU-bound process",
                latency_summary(raw),
                "— (context)",
                "—",
            ]
        )

        def ratio_at(q: float) -> str:
            w = nearest_rank([t.latency for t in watched], q)
            r = nearest_rank([t.latency for t in raw], q)
            return fmt_ratio(w / r) if r > 0 else "—"

        rows.append(
            [
                "(h) watcher ÷ raw NOTIFY",
                f"p50 {ratio_at(0.5)}, p95 {ratio_at(0.95)}",
                "— (context)",
                "—",
            ]
        )
        lags = [t.wait_lag for t in watched if t.wait_lag is not None]
        if lags:
            lag95 = nearest_rank(lags, 0.95)
            rows.append(
                [
                    "(k) `wait()` in another process returns after the worker's loop exits, "
                    f"PostgreSQL, interval {NOTIFY_INTERVAL:g} s",
                    f"p50 {fmt_ms(nearest_rank(lags, 0.5))} ms, p95 {fmt_ms(lag95)} ms, "
                    f"max {fmt_ms(max(lags))} ms (n={len(lags)})",
                    f"p95 ≤ {fmt_ms(WAIT_TARGET)} ms",
                    verdict(lag95 <= WAIT_TARGET),
                ]
            )
    else:
        rows.append(["(h) cancel latency with PostgreSQL NOTIFY", "not measured", "—", "—"])
    bound = report.loops[BOUND].best
    mono = report.loops[MONO].best
    for db in report.dbs:
        cp = report.loops[watch_cp_label(db)].best
        rows.append(
            [
                f"(i) `cp()` per call, watcher mode ({db}), vs an empty bound-method call",
                f"{fmt_ratio(cp / bound)} ({fmt_time(cp)} vs {fmt_time(bound)})",
                f"≤ {HOT_TARGET:g}x",
                verdict(cp / bound <= HOT_TARGET),
            ]
        )
    inline_cp = report.loops[inline_cp_label(report.dbs[0])].best
    rows.append(
        [
            f"(i) `cp()` per call, inline mode, no poll due ({report.dbs[0]}), "
            "vs an empty bound-method call",
            f"{fmt_ratio(inline_cp / bound)} ({fmt_time(inline_cp)} vs {fmt_time(bound)}; "
            f"`time.monotonic()` loop {fmt_time(mono)})",
            "— (context)",
            "—",
        ]
    )
    return rows


def render(report: Report) -> str:
    """The whole report as Markdown."""
    s = report.settings
    out = report_head("watcher", report.header, report.warnings)
    out += table(["row", "measured", "target", "verdict"], summary_rows(report))

    out += ["", "## (g) statements sent while N jobs run, per mode", ""]
    out.append(
        f"`Jobs(engine, model, interval={POLL_INTERVAL:g}, watch=False)` (inline) or the "
        f"same with `watch=True` (watcher); one thread per job calling `cp()` every "
        f"{CALL_EVERY:g} s. "
        f"Counted over a {s.window:g} s window after a warm-up of {s.warmup:g} s, "
        "from the engine's `before_cursor_execute` events. Status queries = SELECTs on the "
        "job table + `UPDATE ... RETURNING` (the watcher's heartbeat, which returns the rows); "
        "a heartbeat UPDATE without RETURNING is counted apart. `stats().polls` is what "
        'dbcancel itself counted. "s between polls" is the mean gap between two of the '
        "watcher's status queries (the interval, ±10 % jitter, plus the poll's own duration). "
        "CPU is `time.process_time()` of this process (all threads) "
        "per second of the window."
    )
    out.append("")
    out += table(
        [
            "database",
            "jobs",
            "mode",
            "window s",
            "SELECT",
            "UPDATE…RETURNING",
            "heartbeat UPDATE",
            "other",
            "status queries/s",
            "per job /s",
            "per interval",
            "`stats().polls`",
            "watcher: s between polls",
            "CPU s/s",
            "jobs started in",
        ],
        [
            [
                r.db,
                f"{r.jobs:,}",
                r.mode,
                f"{r.seconds:.2f}",
                f"{r.selects:,}",
                f"{r.returning:,}",
                f"{r.beats:,}",
                f"{r.other:,}",
                fmt_rate(r.per_second),
                fmt_small(r.per_second / r.jobs),
                f"{r.per_interval:,.2f}",
                f"{r.polls:,}",
                "—" if r.cycle is None else f"{r.cycle:.3f}",
                f"{r.cpu / r.seconds:.2f}",
                f"{r.started_in:.2f} s",
            ]
            for r in report.rates
        ],
    )

    out += ["", "## (h) cancel latency through NOTIFY, another process (ms)", ""]
    if report.notify:
        assert report.work_item is not None
        out.append(
            f"Work item: `busy({report.work_n})`, a pure-Python loop holding the GIL, "
            f"{fmt_time(report.work_item.best)} min / {fmt_time(report.work_item.median)} "
            "median. Watcher: the child runs `with jobs.run(id) as cp: while True: cp(); "
            f"busy(n)` with `Jobs(watch=True, interval={NOTIFY_INTERVAL:g})`; the parent calls "
            f"`jobs.cancel(id)`, which sends `pg_notify('{report.channel}', id)` in its "
            "transaction. Raw: the child's listener thread iterates `conn.notifies()` on a "
            "plain psycopg connection and sets a `threading.Event` that the same work loop "
            "checks; the parent commits `SELECT pg_notify(...)`. Both from the call's return "
            "to the child's loop exit (`time.monotonic()`, system-wide), cancel after "
            f"{CANCEL_DELAY[0]:g}-{CANCEL_DELAY[1]:g} s, interleaved in a shuffled order per "
            "round after one warm-up round. Percentiles are nearest-rank. Polls and "
            "notifications are the child's `jobs.stats()` deltas over each job."
        )
        out.append("")
        rows = []
        for variant, trials in report.notify.items():
            samples = [t.latency for t in trials]
            calls = [t.call for t in trials]
            watched = variant == WATCHED
            rows.append(
                [
                    variant,
                    str(len(samples)),
                    fmt_ms(min(samples)),
                    fmt_ms(nearest_rank(samples, 0.5)),
                    fmt_ms(nearest_rank(samples, 0.95)),
                    fmt_ms(max(samples)),
                    f"{fmt_ms(nearest_rank(calls, 0.5))} / {fmt_ms(max(calls))}",
                    f"{by_notify(trials)} of {len(trials)}" if watched else "—",
                    (
                        f"{min(t.polls for t in trials)}-{max(t.polls for t in trials)}"
                        if watched
                        else "—"
                    ),
                    f"{sum(t.listening for t in trials)} of {len(trials)}" if watched else "—",
                ]
            )
        out += table(
            [
                "variant",
                "n",
                "min",
                "p50",
                "p95",
                "max",
                "call p50 / max",
                "seen through NOTIFY",
                "polls per job",
                "listening at exit",
            ],
            rows,
        )
    else:
        out.append("Not measured: it needs PostgreSQL (run without `--sqlite-only`).")

    out += ["", "## (i) per-iteration cost of the loops", ""]
    out.append(
        f"timeit loops of {s.loop_number:,} iterations, {s.loop_repeat} runs each, "
        "interleaved in a shuffled order per round; min and median over the runs. Checkpoints "
        f"from `Jobs(..., interval={NO_POLL_INTERVAL:g})`, entered with `jobs.run()`, so that "
        "neither mode polls during the loops. Statements sent during the loops (must be 0): "
        f"{report.statements_during_loops}."
    )
    out.append("")
    bound = report.loops[BOUND].best
    mono = report.loops[MONO].best
    out += table(
        ["loop body", "min ns/iter", "median ns/iter", "min ÷ bound method", "min ÷ monotonic"],
        [
            [
                label,
                f"{t.best * 1e9:.1f}",
                f"{t.median * 1e9:.1f}",
                f"{t.best / bound:.2f}x",
                f"{t.best / mono:.2f}x",
            ]
            for label, t in report.loops.items()
        ],
    )
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WATCH_FLAG]:
        return child_watch_main(argv[1:])
    if argv[:1] == [RAW_FLAG]:
        return child_raw_main(argv[1:])
    args = parse_args(
        argv,
        "Measure dbcancel's watcher: status queries per second, cancel latency through "
        "NOTIFY, and the cost of cp() in watcher mode.",
    )
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    report = Report(Settings.make(args.quick, args.trials), seed)
    announce(args.quick, "3")
    table_name = f"dbcancel_bench_watch_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    fingerprint = source_fingerprint()

    with (
        tempfile.TemporaryDirectory(prefix="dbcancel-bench-watch-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        dbs = open_databases(stack, args, Path(tmp), table_name)
        if dbs is None:
            return 2
        report.dbs = [db.name for db in dbs]
        describe(report, dbs)  # type: ignore[arg-type]  # the same header fields
        measure_rates(report, dbs, rng)
        pg = next((db for db in dbs if db.name == "PostgreSQL"), None)
        if pg is not None:
            progress("calibrating the ~100 µs work item")
            report.work_n, report.work_item = calibrate_work()
            measure_notify(report, pg, rng)
        # The (g) watchers are in their last wait of about one interval: let them go idle,
        # so that (i)'s 3600 s checkpoints set their next wait and nothing polls.
        time.sleep(POLL_INTERVAL * 1.1 + 0.2)
        progress("(i) watcher-mode cp() vs a bound-method call")
        measure_hot_path(report, dbs, rng)

    report.header["load avg at end"] = load_average()
    report.header["took"] = f"{time.monotonic() - started:.0f} s"
    if source_fingerprint() != fingerprint:
        report.warnings.append(
            "dbcancel's source files changed during this run: the numbers may mix versions."
        )
    return finish(render(report))


if __name__ == "__main__":
    sys.exit(main())
