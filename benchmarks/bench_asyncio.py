"""asyncio benchmark of dbcancel: `AsyncJobs` on an event loop.

Run from the repository root (as a script: it imports its helpers from ``bench_core.py``
beside it)::

    .venv/bin/python benchmarks/bench_asyncio.py              # full run, about 3 minutes
    .venv/bin/python benchmarks/bench_asyncio.py --quick      # smoke run, under a minute
    .venv/bin/python benchmarks/bench_asyncio.py --sqlite-only
    .venv/bin/python benchmarks/bench_asyncio.py --pg-url postgresql+psycopg://user@host/db

Five measurements, side by side in one run (SQLite through aiosqlite, PostgreSQL
through asyncpg):

* (k) the cost of an `AsyncJobs` job's ``cp()``, called in a coroutine, against a bare
  attribute read (``if flag.cancelled: pass``) in the same coroutine;
* (l) cancel latency in the same process with ``run(job_id, cancel_task=True)``, the body
  blocked in ``await asyncio.sleep(3600)``: from ``await jobs.cancel()`` returning to the
  body's ``CancelledError``;
* (m) cancel latency from another process through PostgreSQL NOTIFY at an interval of
  10 s (polling cannot deliver it), beside the raw floor: a plain asyncpg connection's
  ``add_listener`` setting an ``asyncio.Event`` the body awaits, in a child of its own;
* (n) how long the loop is kept from other tasks while 1,000 jobs run and 100 cancels
  and waits are awaited: a 10 ms ticker's p99 gap against its p99 gap with the jobs
  running alone (the control, measured right before);
* (o) threads used by 1,000 concurrent ``await jobs.wait()``.

The Markdown report goes to stdout, progress to stderr. The benchmark creates its own
uniquely named table (in a temporary SQLite file and in the PostgreSQL database given
by ``--pg-url``) and drops it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_core import (
    Child,
    Database,
    Timing,
    add_job,
    announce,
    describe,
    finish,
    fmt_ms,
    fmt_ratio,
    fmt_time,
    make_model,
    nearest_rank,
    open_databases,
    parse_args,
    progress,
    python_command,
    report_head,
    table,
    verdict,
)
from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from dbcancel import AsyncJobs, Jobs, Status

NO_POLL_INTERVAL = 3600.0
"""The interval of the (k) and (l) jobs: no poll falls due while they are timed."""
HOT_TARGET = 2.0
"""(k) target: ``cp()`` at most twice a bare attribute read."""
SAME_TARGET = 0.002
"""(l) target: p95 at most 2 ms."""
NOTIFY_INTERVAL = 10.0
"""The interval of the (m) jobs: far longer than any latency NOTIFY delivers."""
NOTIFY_TARGET = 1.2
"""(m) target: p95 at most 1.2x the raw floor's p95, measured in the same run."""
TICK = 0.01
"""The (n) ticker's period."""
BLOCK_TARGET = 2.0
"""(n) target: the ticker's p99 gap at most twice the control's."""
WAITERS_TARGET = 2
"""(o) target: at most two threads more while the waiters wait."""
CANCEL_DELAY = (0.02, 0.1)
"""(l), (m): seconds between a job's start and its cancel, drawn uniformly."""
CHILD_FLAG = "--child-async-worker"
"""argv[1] of the (m) subprocess running `AsyncJobs` jobs (not a user option)."""
RAW_FLAG = "--child-raw-asyncpg"
"""argv[1] of the (m) subprocess with a plain asyncpg listener (not a user option)."""
TIMEOUT = 60.0

ATTR = "`if flag.cancelled: pass`, a bare attribute read"
BOUND = "`obj.method()`, an empty bound method"
DBC = "`jobs.cancel()` → `AsyncJobs` (asyncpg) listener → task cancelled"
RAW = "raw NOTIFY → asyncpg `add_listener` → `asyncio.Event`"


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run or the ``--quick`` smoke run."""

    quick: bool
    loop_number: int
    loop_repeat: int
    trials: int
    jobs: int
    cancels: int
    window: float
    waiters: int

    @classmethod
    def make(cls, quick: bool, trials: int | None) -> Settings:
        if quick:
            return cls(True, 300_000, 3, trials or 8, 200, 20, 1.0, 200)
        return cls(False, 1_000_000, 7, trials or 40, 1000, 100, 3.0, 1000)


@dataclass
class Blocking:
    """(n) on one database: the ticker's gaps without and with the cancels and waits."""

    db: str
    jobs: int
    cancels: int
    control: list[float]
    loaded: list[float]
    started_in: float


@dataclass
class Waiters:
    """(o) on one database."""

    db: str
    waiters: int
    before: int
    peak: int
    took: float


@dataclass
class Report:
    settings: Settings
    seed: int
    header: dict[str, str] = field(default_factory=dict)
    dbs: list[str] = field(default_factory=list)
    loops: dict[str, Timing] = field(default_factory=dict)
    same: dict[str, list[float]] = field(default_factory=dict)
    same_calls: dict[str, list[float]] = field(default_factory=dict)
    notify: dict[str, list[float]] = field(default_factory=dict)
    blocking: list[Blocking] = field(default_factory=list)
    waiters: list[Waiters] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def async_url(db: Database) -> str:
    """The database's URL for its async driver: aiosqlite, or asyncpg."""
    url = make_url(db.url)
    driver = "sqlite+aiosqlite" if db.name == "SQLite" else "postgresql+asyncpg"
    return url.set(drivername=driver).render_as_string(hide_password=False)


def async_engine(db: Database) -> AsyncEngine:
    kwargs: dict[str, Any] = {}
    if db.name == "SQLite":
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_size=20, max_overflow=20)
    return create_async_engine(async_url(db), **kwargs)


def add_jobs(db: Database, n: int) -> list[int]:
    """Insert ``n`` pending jobs in one statement; their ids."""
    with db.engine.begin() as conn:
        result = conn.execute(
            insert(db.model).returning(db.model.id), [{"status": Status.PENDING}] * n
        )
        return [int(i) for i in result.scalars()]


# -- (k) the checkpoint's cost on the loop ------------------------------------------------


class Flag:
    """What a hand-written cancellation flag is: an object with a bool attribute."""

    def __init__(self) -> None:
        self.cancelled = False

    def method(self) -> None:
        pass


def timed(stmt: str, names: dict[str, Any], number: int) -> Callable[[], float]:
    """A timing of ``number`` runs of ``stmt`` (seconds per run), the GC off."""
    bound = "".join(f", {name}={name}" for name in names)  # fast locals, as in timeit
    src = f"def run(n{bound}):\n    for _ in range(n):\n        {stmt}\n"
    scope: dict[str, Any] = dict(names)
    exec(src, scope)  # the loop body compiled as written: no call around it
    run = scope["run"]

    def one() -> float:
        gc.disable()
        try:
            t0 = time.perf_counter()
            run(number)
            return (time.perf_counter() - t0) / number
        finally:
            gc.enable()

    return one


async def measure_hot_path(report: Report, jobs_by_db: dict[str, AsyncJobs], ids: dict[str, int]):
    """(k): every loop runs inside a coroutine, interleaved in a shuffled order."""
    s = report.settings
    flag = Flag()
    variants: dict[str, Callable[[], float]] = {
        "empty `for` loop": timed("pass", {}, s.loop_number),
        ATTR: timed("if flag.cancelled: pass", {"flag": flag}, s.loop_number),
        BOUND: timed("flag.method()", {"flag": flag}, s.loop_number),
    }
    async with contextlib.AsyncExitStack() as stack:
        for name, jobs in jobs_by_db.items():
            cp = await stack.enter_async_context(jobs.run(ids[name]))
            variants[cp_label(name)] = timed("cp()", {"cp": cp}, s.loop_number)
        results = {label: Timing(label, []) for label in variants}
        rng = random.Random(report.seed)
        for _ in range(s.loop_repeat):
            order = list(variants)
            rng.shuffle(order)
            for label in order:
                results[label].per_iter.append(variants[label]())
                await asyncio.sleep(0)  # the loop runs between timings
    report.loops = results


def cp_label(db: str) -> str:
    return f"`cp()` of an `AsyncJobs` job ({db})"


# -- (l) same process, task cancellation ------------------------------------------------


async def measure_same_process(
    report: Report, name: str, db: Database, jobs: AsyncJobs, rng: random.Random
) -> None:
    samples: list[float] = []
    calls: list[float] = []
    for n in range(report.settings.trials + 1):  # the first one is a warm-up
        job = add_job(db.engine, db.model)
        started = asyncio.Event()
        stopped: list[float] = []

        async def body(job: int = job, started: asyncio.Event = started) -> None:
            async with jobs.run(job, cancel_task=True):
                started.set()
                try:
                    await asyncio.sleep(3600)
                finally:
                    stopped.append(time.monotonic())  # noqa: B023 - read in this round

        task = asyncio.create_task(body())
        await started.wait()
        await asyncio.sleep(rng.uniform(*CANCEL_DELAY))
        called = time.monotonic()
        await jobs.cancel(job, reason="bench")
        returned = time.monotonic()
        await asyncio.wait_for(task, TIMEOUT)
        if n:
            samples.append(stopped[0] - returned)
            calls.append(returned - called)
    report.same[name] = samples
    report.same_calls[name] = calls


# -- (m) another process, NOTIFY --------------------------------------------------------


def this_script(name: str, *args: str) -> Child:
    child = Child(python_command(str(Path(__file__).resolve()), *args), name)
    child.expect("ready")
    return child


async def stdin_lines() -> Any:
    """The lines of stdin, read in a thread of their own, as an async iterator."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


def child_async_main(argv: list[str]) -> int:
    """(m): `AsyncJobs` at a 10 s interval, each job's body blocked in an await with
    `cancel_task=True`; prints ``exited MONOTONIC`` when the body is cancelled."""
    url, table_name = argv

    async def main() -> None:
        _, model = make_model(table_name)
        engine = create_async_engine(url)
        jobs = AsyncJobs(engine, model, interval=NOTIFY_INTERVAL)
        # Listening before the first job: its listener opens while the jobs run.
        print("ready", flush=True)
        async for line in stdin_lines():
            stopped: list[float] = []
            job = int(line)

            async def body(job: int = job) -> None:
                async with jobs.run(job, cancel_task=True):
                    print("started", flush=True)
                    try:
                        await asyncio.sleep(3600)
                    finally:
                        stopped.append(time.monotonic())  # noqa: B023

            await body()
            print(f"exited {stopped[0]!r} {int(jobs.stats().listening)}", flush=True)
        await engine.dispose()

    asyncio.run(main())
    return 0


def child_raw_main(argv: list[str]) -> int:
    """(m) floor: an asyncpg connection LISTENing with ``add_listener``; each payload read
    on stdin is awaited as an ``asyncio.Event``; prints ``exited MONOTONIC``."""
    dsn, channel = argv

    async def main() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        wanted: list[str | None] = [None]
        seen = asyncio.Event()

        def received(_c: Any, _pid: int, _ch: str, payload: str) -> None:
            if payload == wanted[0]:
                seen.set()

        await conn.add_listener(channel, received)
        print("ready", flush=True)
        async for line in stdin_lines():
            wanted[0] = line
            seen.clear()
            print("started", flush=True)
            await seen.wait()
            print(f"exited {time.monotonic()!r}", flush=True)
        await conn.close()

    asyncio.run(main())
    return 0


def measure_notify(report: Report, db: Database, rng: random.Random) -> None:
    table_name = db.model.__tablename__
    sync_jobs = Jobs(db.engine, db.model, interval=NOTIFY_INTERVAL)
    raw_channel = f"dbcancel_bench_raw_{os.getpid()}"
    dsn = make_url(db.url).set(drivername="postgresql")
    dsn = dsn.difference_update_query(["options"]).render_as_string(hide_password=False)
    trials = report.settings.trials
    progress(f"(m) PostgreSQL NOTIFY: {trials} cancels per variant, interleaved")
    worker = this_script("async worker", CHILD_FLAG, async_url(db), table_name)
    raw = this_script("raw listener", RAW_FLAG, dsn, raw_channel)
    results: dict[str, list[float]] = {DBC: [], RAW: []}
    listened = 0
    try:
        for n in range(trials + 1):
            order = [DBC, RAW]
            rng.shuffle(order)
            for variant in order:
                if variant == DBC:
                    job = add_job(db.engine, db.model)
                    worker.send(str(job))
                    worker.expect("started")
                    time.sleep(rng.uniform(*CANCEL_DELAY))
                    sync_jobs.cancel(job, reason="bench")
                    done = time.monotonic()
                    _, exited, listening = worker.expect(
                        "exited", NOTIFY_INTERVAL * 2 + TIMEOUT
                    ).split()
                    listened += int(listening)
                else:
                    payload = f"raw-{n}"
                    raw.send(payload)
                    raw.expect("started")
                    time.sleep(rng.uniform(*CANCEL_DELAY))
                    with db.engine.begin() as conn:
                        conn.execute(select(func.pg_notify(raw_channel, payload)))
                    done = time.monotonic()
                    exited = raw.expect("exited").split()[1]
                if n:
                    results[variant].append(float(exited) - done)
    finally:
        worker.close()
        raw.close()
    if listened < trials:
        report.warnings.append(
            f"(m): the worker's listener was up for {listened} of {trials + 1} jobs"
        )
    report.notify = results


# -- (n) loop blocking, (o) waiters ------------------------------------------------------


async def ticker_gaps(
    seconds: float, during: Callable[[], Awaitable[object]] | None
) -> list[float]:
    """A ticker sleeping TICK at a time for ``seconds`` (or while ``during()`` runs):
    the gaps between its ticks."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    if during is None:
        await asyncio.sleep(seconds)
    else:
        await during()
    stop.set()
    await task
    return gaps


async def measure_blocking(
    report: Report, name: str, db: Database, jobs: AsyncJobs, rng: random.Random
) -> None:
    s = report.settings
    ids = add_jobs(db, s.jobs)
    release = asyncio.Event()
    started = 0
    all_started = asyncio.Event()

    async def work(job: int) -> None:
        nonlocal started
        async with jobs.run(job, cancel_task=True) as cp:
            started += 1
            if started == len(ids):
                all_started.set()
            while not release.is_set():
                cp()
                await asyncio.sleep(0.1)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(work(j)) for j in ids]
    await asyncio.wait_for(all_started.wait(), TIMEOUT * 5)
    started_in = time.monotonic() - t0
    await asyncio.sleep(max(jobs.interval * 2, 0.5))  # polls under way
    gc.collect()
    control = await ticker_gaps(s.window, None)
    chosen = rng.sample(ids, s.cancels)

    async def cancel_and_wait(job: int) -> None:
        await asyncio.sleep(rng.uniform(0, s.window))
        await jobs.cancel(job, reason="bench")
        await jobs.wait(job, timeout=TIMEOUT)

    async def during() -> None:
        await asyncio.gather(*(cancel_and_wait(j) for j in chosen))

    gc.collect()
    loaded = await ticker_gaps(s.window, during)
    release.set()
    await asyncio.gather(*tasks)
    report.blocking.append(Blocking(name, s.jobs, s.cancels, control, loaded, started_in))


async def measure_waiters(report: Report, name: str, db: Database, jobs: AsyncJobs) -> None:
    s = report.settings
    ids = add_jobs(db, s.waiters)
    release = asyncio.Event()
    running = 0
    all_running = asyncio.Event()

    async def work(job: int) -> None:
        nonlocal running
        async with jobs.run(job) as cp:
            running += 1
            if running == len(ids):
                all_running.set()
            while not release.is_set():
                cp()
                await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(work(j)) for j in ids]
    await asyncio.wait_for(all_running.wait(), TIMEOUT * 5)
    await asyncio.sleep(0.5)
    before = threading.active_count()
    peak = before
    t0 = time.monotonic()
    waiters = [asyncio.create_task(jobs.wait(j, timeout=TIMEOUT)) for j in ids]
    # While they wait: after the release, the jobs' own ends take connections too.
    for _ in range(40):
        await asyncio.sleep(0.025)
        peak = max(peak, threading.active_count())
    release.set()
    await asyncio.wait(waiters)
    took = time.monotonic() - t0
    assert {w.result() for w in waiters} == {Status.COMPLETED}
    await asyncio.gather(*tasks)
    report.waiters.append(Waiters(name, len(ids), before, peak, took))


# -- rendering ---------------------------------------------------------------------------


def summary_rows(report: Report) -> list[list[str]]:
    rows: list[list[str]] = []
    attr = report.loops[ATTR].best
    for db in report.dbs:
        cp = report.loops[cp_label(db)].best
        rows.append(
            [
                f"(k) `cp()` per call, `AsyncJobs` job ({db}), in a coroutine, ÷ a bare "
                "attribute read",
                f"{fmt_ratio(cp / attr)} ({fmt_time(cp)} vs {fmt_time(attr)})",
                f"≤ {HOT_TARGET:g}x",
                verdict(cp / attr <= HOT_TARGET),
            ]
        )
    bound = report.loops[BOUND].best
    rows.append(
        [
            "(k) an empty bound-method call ÷ the bare attribute read (the cost of any call)",
            f"{fmt_ratio(bound / attr)} ({fmt_time(bound)})",
            "— (context)",
            "—",
        ]
    )
    for db, samples in report.same.items():
        p95 = nearest_rank(samples, 0.95)
        rows.append(
            [
                f"(l) cancel latency, same process, `cancel_task=True`, body blocked in "
                f"`await`, {db}",
                f"p50 {fmt_ms(nearest_rank(samples, 0.5))} / p95 {fmt_ms(p95)} ms (max "
                f"{fmt_ms(max(samples))}; n={len(samples)})",
                f"p95 ≤ {fmt_ms(SAME_TARGET)} ms",
                verdict(p95 <= SAME_TARGET),
            ]
        )
    if report.notify:
        ours, raw = report.notify[DBC], report.notify[RAW]
        p95, floor = nearest_rank(ours, 0.95), nearest_rank(raw, 0.95)
        rows.append(
            [
                f"(m) cancel latency, another process, PostgreSQL NOTIFY, interval "
                f"{NOTIFY_INTERVAL:g} s, ÷ the raw NOTIFY floor",
                f"p95 {fmt_ratio(p95 / floor)} ({fmt_ms(p95)} vs {fmt_ms(floor)} ms; p50 "
                f"{fmt_ms(nearest_rank(ours, 0.5))} vs {fmt_ms(nearest_rank(raw, 0.5))}; "
                f"n={len(ours)})",
                f"p95 ≤ {NOTIFY_TARGET:g}x the floor",
                verdict(p95 <= NOTIFY_TARGET * floor),
            ]
        )
    else:
        rows.append(["(m) cancel latency with PostgreSQL NOTIFY", "not measured", "—", "—"])
    for b in report.blocking:
        c99, l99 = nearest_rank(b.control, 0.99), nearest_rank(b.loaded, 0.99)
        rows.append(
            [
                f"(n) loop blocking, {b.jobs:,} jobs running, {b.cancels} cancels + waits "
                f"awaited, {b.db}: ticker p99 gap ÷ control",
                f"{fmt_ratio(l99 / c99)} ({fmt_ms(l99)} vs {fmt_ms(c99)} ms; max "
                f"{fmt_ms(max(b.loaded))} vs {fmt_ms(max(b.control))})",
                f"≤ {BLOCK_TARGET:g}x",
                verdict(l99 <= BLOCK_TARGET * c99),
            ]
        )
    for w in report.waiters:
        used = w.peak - w.before
        rows.append(
            [
                f"(o) threads used by {w.waiters:,} concurrent `await jobs.wait()`, {w.db}",
                f"{used} ({w.before} before, {w.peak} at most during 1 s of waiting; all "
                f"returned {w.took - 1:.2f} s after the jobs were let go)",
                f"≤ {WAITERS_TARGET}",
                verdict(used <= WAITERS_TARGET),
            ]
        )
    return rows


def render(report: Report) -> str:
    s = report.settings
    out = report_head("asyncio", report.header, report.warnings)
    out += table(["row", "measured", "target", "verdict"], summary_rows(report))
    out += ["", "## (k) per-call cost in a coroutine", ""]
    out.append(
        f"Each loop runs {s.loop_number:,} iterations inside a coroutine, "
        f"{s.loop_repeat} times, interleaved in a shuffled order, the GC off; best of the "
        f"runs (median in brackets). The jobs run with `interval={NO_POLL_INTERVAL:g}`."
    )
    out.append("")
    out += table(
        ["loop body", "per iteration"],
        [[t.label, f"{fmt_time(t.best)} ({fmt_time(t.median)})"] for t in report.loops.values()],
    )
    out += ["", "## (l), (m) cancel latency (ms)", ""]
    out.append(
        "(l): `await jobs.cancel()` in another task of the same loop, the body "
        "`await asyncio.sleep(3600)` under `run(job_id, cancel_task=True)`, from cancel() "
        "returning to the body's `finally`. (m): the parent's `Jobs.cancel()` (psycopg) "
        f"against a child's `AsyncJobs` (asyncpg, interval {NOTIFY_INTERVAL:g} s) with the "
        "same body, and a child whose asyncpg connection LISTENs and sets an "
        "`asyncio.Event` the body awaits; from the commit to the child's stop "
        "(`time.monotonic()`, system-wide), interleaved after one warm-up round. "
        "Percentiles are nearest-rank."
    )
    out.append("")
    rows = []
    for db, samples in report.same.items():
        calls = report.same_calls[db]
        rows.append(
            [
                f"(l) same process, {db}",
                str(len(samples)),
                fmt_ms(min(samples)),
                fmt_ms(nearest_rank(samples, 0.5)),
                fmt_ms(nearest_rank(samples, 0.95)),
                fmt_ms(max(samples)),
                fmt_ms(nearest_rank(calls, 0.5)),
            ]
        )
    for variant, samples in report.notify.items():
        rows.append(
            [
                f"(m) {variant}",
                str(len(samples)),
                fmt_ms(min(samples)),
                fmt_ms(nearest_rank(samples, 0.5)),
                fmt_ms(nearest_rank(samples, 0.95)),
                fmt_ms(max(samples)),
                "—",
            ]
        )
    out += table(["variant", "n", "min", "p50", "p95", "max", "cancel() p50"], rows)
    out += ["", "## (n) the loop while jobs run (ms between ticks)", ""]
    out.append(
        f"A ticker task sleeps {TICK * 1000:g} ms at a time. Control: {s.window:g} s while "
        "the jobs run alone (each `cp()` then `await asyncio.sleep(0.1)`, the loop's "
        f"runtime polling them), right before the measured {s.window:g} s in which the "
        "cancels and waits are awaited, each started at a random moment of the window."
    )
    out.append("")
    out += table(
        ["database", "jobs", "started in", "window", "p50", "p99", "max", "ticks"],
        [
            row
            for b in report.blocking
            for row in (
                [
                    b.db,
                    f"{b.jobs:,}",
                    f"{b.started_in:.2f} s",
                    "control",
                    fmt_ms(nearest_rank(b.control, 0.5)),
                    fmt_ms(nearest_rank(b.control, 0.99)),
                    fmt_ms(max(b.control)),
                    str(len(b.control)),
                ],
                [
                    b.db,
                    f"{b.jobs:,}",
                    "",
                    f"{b.cancels} cancels + waits",
                    fmt_ms(nearest_rank(b.loaded, 0.5)),
                    fmt_ms(nearest_rank(b.loaded, 0.99)),
                    fmt_ms(max(b.loaded)),
                    str(len(b.loaded)),
                ],
            )
        ],
    )
    out.append("")
    out.append(
        "(o): `threading.active_count()` before the waiters start and at its highest "
        "during their first second of waiting (sampled every 25 ms), the jobs still "
        "running; then the jobs are let go and the waits return. aiosqlite runs each "
        "pooled connection in a thread of its own."
    )
    out.append("")
    return "\n".join(out) + "\n"


# -- main --------------------------------------------------------------------------------


async def run_async(report: Report, dbs: list[Database], rng: random.Random) -> None:
    engines = {db.name: async_engine(db) for db in dbs}
    try:
        jobs_by_db = {
            db.name: AsyncJobs(engines[db.name], db.model, interval=NO_POLL_INTERVAL) for db in dbs
        }
        ids = {db.name: add_job(db.engine, db.model) for db in dbs}
        progress("(k) checkpoint cost in a coroutine")
        await measure_hot_path(report, jobs_by_db, ids)
        for db in dbs:
            progress(f"(l) same-process cancel latency, {db.name}")
            await measure_same_process(report, db.name, db, jobs_by_db[db.name], rng)
        for db in dbs:
            jobs = AsyncJobs(engines[db.name], db.model, interval=0.5)
            progress(f"(n) loop blocking, {report.settings.jobs} jobs, {db.name}")
            await measure_blocking(report, db.name, db, jobs, rng)
            progress(f"(o) {report.settings.waiters} waiters, {db.name}")
            await measure_waiters(report, db.name, db, jobs)
    finally:
        for engine in engines.values():
            await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return child_async_main(argv[1:])
    if argv[:1] == [RAW_FLAG]:
        return child_raw_main(argv[1:])
    args = parse_args(argv, "Measure dbcancel's AsyncJobs on an event loop.")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    report = Report(Settings.make(args.quick, args.trials), seed)
    announce(args.quick, "3")
    table_name = f"dbcancel_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with (
        tempfile.TemporaryDirectory(prefix="dbcancel-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        dbs = open_databases(stack, args, Path(tmp), table_name)
        if dbs is None:
            return 2
        describe(report, dbs)  # type: ignore[arg-type]
        report.dbs = [db.name for db in dbs]
        asyncio.run(run_async(report, dbs, rng))
        pg = next((db for db in dbs if db.name == "PostgreSQL"), None)
        if pg is not None:
            measure_notify(report, pg, rng)
    return finish(render(report))


if __name__ == "__main__":
    sys.exit(main())
