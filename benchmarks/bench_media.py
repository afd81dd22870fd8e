"""Media benchmark of dbcancel: ``receive()`` throughput, close latency, ``analyze()`` speed.

Run from the repository root (as a script: it imports its helpers from ``bench_core.py``
beside it)::

    .venv/bin/python benchmarks/bench_media.py              # full run, a few minutes
    .venv/bin/python benchmarks/bench_media.py --quick      # smoke run, under a minute
    .venv/bin/python benchmarks/bench_media.py --sqlite-only
    .venv/bin/python benchmarks/bench_media.py --pg-url postgresql+psycopg://user@host/db

Three measurements, side by side in one run on loopback, each against a bare websockets
client doing the same work without dbcancel:

* (d) messages per second through ``dbcancel.media.receive(ws, cp)`` versus a bare
  ``async for message in ws``, from a push server that sends small text messages as fast
  as it can, with a real checkpoint whose poller runs during the measurement;
* (e) close latency after a cancel: from ``jobs.cancel()`` returning to the server
  receiving the 1001 close frame, with the stream on an event loop in another thread of
  this process, or in another process;
* (f) frames per second of ``MediaAnalysisService.analyze()`` versus a bare lock-step
  client, against the real analysis server of ``examples/analysis_server.py``.

The Markdown report goes to stdout, progress to stderr. See ``benchmarks/README.md`` for
what each row measures. The benchmark creates its own uniquely named table (in a temporary
SQLite file and in the PostgreSQL database given by ``--pg-url``) and drops it at the end.
It uses only the standard library, SQLAlchemy, the database drivers, websockets and
dbcancel itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import json
import math
import os
import platform
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import bench_core
import sqlalchemy
from bench_core import (
    Database,
    add_job,
    announce,
    finish,
    fmt_ms,
    git_state,
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
    verdict,
    version,
)
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Event

import dbcancel
from dbcancel import Checkpoint, Jobs
from dbcancel._aio import watching  # diagnostic only: the poller without receive()
from dbcancel.media import CANCEL_CLOSE_CODE, CANCEL_CLOSE_REASON, MediaAnalysisService, receive

T = TypeVar("T")

THROUGHPUT_INTERVAL = 0.05
"""Checkpoint interval in (d) and (f): short, so that the poller runs during the timed runs."""
INTERVALS = (0.05, 0.5)
"""The checkpoint intervals the close-latency rows are measured at."""
MESSAGE = b'{"seq": 1234, "kind": "tick"}'
"""The small text message the push server sends in (d) (29 bytes)."""
PUSH_FLAG = "--push-server"
"""argv[1] of the subprocess that runs the (d) push server (not a user option)."""
STREAM_FLAG = "--child-stream"
"""argv[1] of the subprocess that runs the (e) cross-process streams (not a user option)."""
TIMEOUT = 60.0
"""Seconds to wait for any step before the benchmark gives up."""
ANALYSIS_SERVER = Path(__file__).resolve().parents[1] / "examples" / "analysis_server.py"
"""The real analysis server (f) runs against, started as a subprocess."""
SAME_TARGET = 0.100
"""(e) target in the same process: the connection closed within 100 ms of the cancel."""
CROSS_MARGIN = 0.100
"""(e) target from another process: within ``interval`` + 100 ms."""
OVERHEAD_TARGET = 0.05
"""(d) target: ``receive()`` at most 5 % slower than a bare ``async for``."""

# Variant labels of (d) and (f).
BARE = "bare `async for message in ws`"
PASSTHROUGH = "diagnostic: bare loop through a pass-through async generator"
CHECKING = "diagnostic: pass-through async generator checking `cp.cancelled` per message"
LOCKSTEP = "bare lock-step client (send frame, `recv()` result, `json.loads`)"


def receive_label(db: str) -> str:
    """The (d) variant label of ``receive()`` with a checkpoint on ``db``."""
    return f"`receive(ws, cp)`, {db} checkpoint"


def watching_label(db: str) -> str:
    """The (d) diagnostic label: the bare loop while the poller watches a ``db`` checkpoint."""
    return f"diagnostic: bare loop while the poller watches a {db} checkpoint"


def analyze_label(db: str) -> str:
    """The (f) variant label of ``analyze()`` with a checkpoint on ``db``."""
    return f"`MediaAnalysisService.analyze()`, {db} checkpoint"


# -- settings and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run or the ``--quick`` smoke run."""

    quick: bool
    messages: int
    """Messages per timed (d) run."""
    rounds: int
    """Timed runs per (d) variant, interleaved."""
    frames: int
    """Frames per (f) analysis."""
    frame_bytes: int
    """Bytes per (f) frame."""
    analyses: int
    """Timed analyses per (f) variant, interleaved."""
    trials: int
    """Cancels per (e) configuration."""

    @classmethod
    def make(cls, quick: bool, trials: int | None) -> Settings:
        """The settings of a full or quick run, with an optional trial count override."""
        if quick:
            return cls(True, 50_000, 3, 200, 16_384, 3, trials or 8)
        return cls(False, 200_000, 15, 1_000, 16_384, 9, trials or 40)


@dataclass(frozen=True)
class Sample:
    """One timed (d) or (f) run."""

    seconds: float
    """Wall-clock seconds (``time.perf_counter()``)."""
    cpu: float
    """CPU seconds of this process, all threads (``time.process_time()``): what the client
    and dbcancel's poller thread used, without the time other processes took the CPUs."""
    polls: int
    """Status queries the variant's database received meanwhile."""


@dataclass
class Runs:
    """The timed runs of one (d) or (f) variant, each over ``count`` items."""

    label: str
    count: int
    db: str | None = None
    """The database of the variant's checkpoint; None for the bare clients."""
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)
    """Status queries the variant's database received during each timed run."""

    def add(self, sample: Sample) -> None:
        """Record one timed run."""
        self.seconds.append(sample.seconds)
        self.cpu.append(sample.cpu)
        self.polls.append(sample.polls)

    @property
    def best_rate(self) -> float:
        """Items per second of the fastest run (noise only ever adds time)."""
        return self.count / min(self.seconds)

    @property
    def median_rate(self) -> float:
        """Items per second of the median run."""
        return self.count / statistics.median(self.seconds)


def overhead(runs: Runs, base: Runs) -> float:
    """How much slower ``runs`` is than ``base``: best time ÷ best time - 1."""
    return min(runs.seconds) / min(base.seconds) - 1


def cpu_overhead(runs: Runs, base: Runs) -> float:
    """How much more CPU ``runs`` used than ``base``: min CPU time ÷ min CPU time - 1."""
    return min(runs.cpu) / min(base.cpu) - 1


def paired_overhead(runs: Runs, base: Runs) -> float:
    """The median over the rounds of (time ÷ the same round's ``base`` time - 1)."""
    return statistics.median(t / b - 1 for t, b in zip(runs.seconds, base.seconds, strict=True))


@dataclass
class Latency:
    """Close latencies (seconds) of one (e) configuration."""

    db: str
    where: str
    interval: float
    samples: list[float] = field(default_factory=list)
    cancel_calls: list[float] = field(default_factory=list)
    """How long each ``jobs.cancel()`` call took (seconds), for context."""
    bad_closes: list[str] = field(default_factory=list)
    """Close frames the server saw that were not 1001 "cancelled"."""

    def pct(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the samples."""
        return nearest_rank(self.samples, q)

    @property
    def target(self) -> float:
        """The target: 100 ms in the same process, interval + 100 ms across processes."""
        return SAME_TARGET if self.where == "same process" else self.interval + CROSS_MARGIN

    @property
    def met(self) -> bool:
        """p95 within the target and every close frame was 1001 "cancelled"."""
        return self.pct(0.95) <= self.target and not self.bad_closes


@dataclass
class Report:
    """Everything measured in one run, rendered as Markdown by :func:`render`."""

    settings: Settings
    seed: int
    dbs: list[str] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    throughput: dict[str, Runs] = field(default_factory=dict)
    analysis: dict[str, Runs] = field(default_factory=dict)
    latencies: list[Latency] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def sample_load(self) -> None:
        """Remember the current 1-minute load average (for the header's max)."""
        with contextlib.suppress(OSError):
            self.loads.append(os.getloadavg()[0])


# -- helpers: subprocesses and event-loop threads ----------------------------------------


class Child(bench_core.Child):
    """A :class:`bench_core.Child` whose exit status must be 0 (or SIGTERM when asked)."""

    def close(self, terminate: bool = False) -> None:
        """Close (or terminate) the child; raise when it exited with another status."""
        super().close(terminate)
        if self.proc.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"the {self.name} exited with status {self.proc.returncode}")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread, driven from sync code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the future resolves in any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result(TIMEOUT)

    def close(self) -> None:
        """Finish async generators and the default executor, stop the loop, join, close."""
        self.run(self.loop.shutdown_asyncgens())
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


# -- (d) receive() throughput ---------------------------------------------------------------


def push_server_main() -> int:
    """The (d) push server (a subprocess): on ``go N``, N small text messages, then close.

    The messages are written as pre-encoded frames in one ``transport.write``, so the
    server costs next to nothing and the client is the bottleneck. It prints ``listening
    PORT`` and serves until its stdin is closed.
    """
    frame = Frame(Opcode.TEXT, MESSAGE).serialize(mask=False)

    async def handler(connection: ServerConnection) -> None:
        async for message in connection:
            words = str(message).split()
            if len(words) == 2 and words[0] == "go":
                connection.transport.write(frame * int(words[1]))
                await connection.close()  # 1000, after the messages in the write buffer
                return

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin

    asyncio.run(main())
    return 0


async def consume(messages: AsyncIterable[str | bytes], n: int) -> tuple[float, float]:
    """Iterate ``messages`` to its end; ``perf_counter()``, ``process_time()`` at the n-th."""
    count = 0
    done_at = cpu_at = math.nan
    async for _message in messages:
        count += 1
        if count == n:
            done_at, cpu_at = time.perf_counter(), time.process_time()
    if count != n:
        raise RuntimeError(f"expected {n} messages, got {count}")
    return done_at, cpu_at


async def passthrough(ws: ClientConnection) -> AsyncIterator[str | bytes]:
    """An async generator that adds nothing but its own layer around ``ws``."""
    async for message in ws:
        yield message


async def checking_passthrough(ws: ClientConnection, cp: Checkpoint) -> AsyncIterator[str | bytes]:
    """``receive()``'s loop without its poller and close callback: the per-message check."""
    async for message in ws:
        if cp.cancelled:
            break
        yield message


async def timed_stream(
    uri: str, n: int, mode: str, jobs: Jobs | None, db: Database | None
) -> Sample:
    """One (d) run: the time from sending ``go n`` to the n-th message, polls meanwhile.

    ``mode`` is ``bare``, ``passthrough``, ``checking``, ``receive`` or ``watching``; the
    last three run inside ``jobs.run()`` on a new job of ``db`` (entered before the clock
    starts).
    """
    async with contextlib.AsyncExitStack() as stack:
        cp = None
        if jobs is not None and db is not None:
            job_id = await asyncio.to_thread(add_job, db.engine, db.model)
            cp = await stack.enter_async_context(jobs.run(job_id))
        ws = await stack.enter_async_context(connect(uri, compression=None))
        gc.collect()
        statements = db.statements if db is not None else [0]
        before = statements[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        await ws.send(f"go {n}")
        if mode == "bare":
            done_at = await consume(ws, n)
        elif mode == "passthrough":
            done_at = await consume(passthrough(ws), n)
        elif mode == "checking":
            assert cp is not None
            done_at = await consume(checking_passthrough(ws, cp), n)
        elif mode == "receive":
            assert cp is not None
            done_at = await consume(receive(ws, cp), n)
        elif mode == "watching":
            assert cp is not None
            async with watching(cp):
                done_at = await consume(ws, n)
        else:
            raise ValueError(mode)
        return Sample(done_at[0] - started, done_at[1] - cpu_started, statements[0] - before)


async def measure_throughput_async(
    report: Report, dbs: list[Database], uri: str, rng: random.Random
) -> None:
    """(d): every variant ``rounds`` times, interleaved in a shuffled order each round."""
    s = report.settings
    variants: dict[str, Callable[[int], Coroutine[Any, Any, Sample]]] = {
        BARE: lambda n: timed_stream(uri, n, "bare", None, None),
        PASSTHROUGH: lambda n: timed_stream(uri, n, "passthrough", None, None),
    }
    dbs_of: dict[str, str] = {}
    for db in dbs:
        jobs = Jobs(db.engine, db.model, interval=THROUGHPUT_INTERVAL)
        if db is dbs[0]:  # no database round trip in this loop: one database is enough
            variants[CHECKING] = functools.partial(
                timed_stream, uri, mode="checking", jobs=jobs, db=db
            )
            dbs_of[CHECKING] = db.name
        variants[receive_label(db.name)] = functools.partial(
            timed_stream, uri, mode="receive", jobs=jobs, db=db
        )
        variants[watching_label(db.name)] = functools.partial(
            timed_stream, uri, mode="watching", jobs=jobs, db=db
        )
        dbs_of[receive_label(db.name)] = dbs_of[watching_label(db.name)] = db.name
    results = {label: Runs(label, s.messages, dbs_of.get(label)) for label in variants}
    for label, run in variants.items():  # warm-up: imports, statement compilation, caches
        await run(min(s.messages, 5_000))
        progress(f"(d) warmed up: {label}")
    for round_no in range(s.rounds):
        order = list(variants)
        rng.shuffle(order)
        for label in order:
            results[label].add(await variants[label](s.messages))
        progress(f"(d) round {round_no + 1}/{s.rounds} done")
    report.throughput = results


def measure_throughput(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(d) with the push server in a subprocess, the client on this thread's event loop."""
    server = Child(python_command(str(Path(__file__).resolve()), PUSH_FLAG), "push server")
    try:
        port = int(server.expect("listening").split()[1])
        asyncio.run(measure_throughput_async(report, dbs, f"ws://127.0.0.1:{port}", rng))
    finally:
        server.close()


# -- (e) close latency after a cancel ---------------------------------------------------


@dataclass(frozen=True)
class SeenClose:
    """A close frame received by the (e) server: when (``time.monotonic()``) and what."""

    at: float
    code: int
    reason: str


class CloseRecorder:
    """The (e) server's record of the close frame received on each path; thread-safe."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._seen: dict[str, SeenClose] = {}

    def record(self, path: str, seen: SeenClose) -> None:
        """Record the first close frame received on ``path``."""
        with self._changed:
            self._seen.setdefault(path, seen)
            self._changed.notify_all()

    def wait(self, path: str, timeout: float = TIMEOUT) -> SeenClose:
        """Wait for the close frame of ``path``."""
        with self._changed:
            if not self._changed.wait_for(lambda: path in self._seen, timeout):
                raise RuntimeError(f"the server saw no close frame on {path} in {timeout}s")
            return self._seen[path]


def recording_connection(recorder: CloseRecorder) -> type[ServerConnection]:
    """A ``ServerConnection`` class that timestamps every close frame as it is parsed."""

    class RecordingConnection(ServerConnection):
        def process_event(self, event: Event) -> None:
            if isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                at = time.monotonic()  # first: the frame has just been read off the socket
                close = Close.parse(event.data)
                path = self.request.path if self.request is not None else ""
                recorder.record(path, SeenClose(at, close.code, close.reason))
            super().process_event(event)

    return RecordingConnection


async def hello_then_silent(connection: ServerConnection) -> None:
    """The (e) server's handler: one ``hello`` message, then silence until the client closes."""
    await connection.send("hello")
    async for _message in connection:
        pass


async def start_close_server(recorder: CloseRecorder) -> Server:
    """Start the (e) server on 127.0.0.1, an ephemeral port; returns the websockets Server."""
    return await serve(
        hello_then_silent,
        "127.0.0.1",
        0,
        compression=None,
        create_connection=recording_connection(recorder),
        close_timeout=2.0,
    )


async def stop_server(server: Server) -> None:
    """Close a websockets ``Server`` and wait for its connections to finish."""
    server.close()
    await server.wait_closed()


async def cancellable_stream(
    jobs: Jobs, job_id: int, uri: str, started: Callable[[], None]
) -> bool:
    """Run job ``job_id``: iterate ``receive()`` until the cancel; True if it was cancelled.

    ``started()`` is called when the first message (the server's hello) has arrived.
    """
    async with (
        jobs.run(job_id) as cp,
        connect(uri, compression=None, open_timeout=TIMEOUT, close_timeout=5.0) as ws,
    ):
        first = True
        async for _message in receive(ws, cp):
            if first:
                first = False
                started()
    return cp.cancelled


def child_stream_main(argv: list[str]) -> int:
    """The cross-process streams: one per ``JOB_ID URI`` line read from stdin.

    Has its own engine and ``Jobs``; prints ``started`` when a stream has its first
    message and ``exited MONOTONIC CANCELLED`` when it has ended.
    """
    url, table_name, interval = argv[0], argv[1], float(argv[2])
    engine = make_engine(url)
    _, model = make_model(table_name)
    jobs = Jobs(engine, model, interval=interval)

    def started() -> None:
        print("started", flush=True)

    async def main() -> None:
        print("ready", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            job_id, uri = line.split()
            cancelled = await cancellable_stream(jobs, int(job_id), uri, started)
            print(f"exited {time.monotonic()!r} {cancelled}", flush=True)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
    return 0


@dataclass
class LatencyRig:
    """What the (e) trials share: the server (its thread and recorder) and a stream loop."""

    server_uri: str
    recorder: CloseRecorder
    stream_loop: LoopThread
    trial_no: int = 0

    def new_path(self, db: Database, job_id: int) -> str:
        """A path no other trial uses: the server records closes per path."""
        self.trial_no += 1
        return f"/{db.name.lower()}/{job_id}/{self.trial_no}"


def check_close(lat: Latency, path: str, seen: SeenClose) -> None:
    """Count a close frame that is not 1001 "cancelled" against the configuration."""
    if (seen.code, seen.reason) != (CANCEL_CLOSE_CODE, CANCEL_CLOSE_REASON):
        lat.bad_closes.append(f"{path}: {seen.code} {seen.reason!r}")


def same_process_trial(
    rig: LatencyRig, db: Database, jobs: Jobs, interval: float, rng: random.Random
) -> tuple[float, float, str, SeenClose]:
    """One cancel, from this (synchronous) thread, of a stream on the stream loop's thread.

    Returns the latency, how long ``cancel()`` took, the path and the close seen.
    """
    job_id = add_job(db.engine, db.model)
    path = rig.new_path(db, job_id)
    started = threading.Event()
    done = rig.stream_loop.submit(
        cancellable_stream(jobs, job_id, rig.server_uri + path, started.set)
    )
    if not started.wait(TIMEOUT):
        done.cancel()
        raise RuntimeError(f"the stream did not start: {done}")
    time.sleep(rng.uniform(interval, 2 * interval))
    called_at = time.monotonic()
    jobs.cancel(job_id)
    cancelled_at = time.monotonic()
    seen = rig.recorder.wait(path)
    if not done.result(TIMEOUT):
        raise RuntimeError(f"the stream of job {job_id} ended without being cancelled")
    return seen.at - cancelled_at, cancelled_at - called_at, path, seen


def cross_process_trial(
    rig: LatencyRig,
    db: Database,
    jobs: Jobs,
    child: Child,
    interval: float,
    rng: random.Random,
) -> tuple[float, float, str, SeenClose]:
    """One cancel, from this process, of a stream running in ``child``."""
    job_id = add_job(db.engine, db.model)
    path = rig.new_path(db, job_id)
    child.send(f"{job_id} {rig.server_uri + path}")
    child.expect("started")
    time.sleep(rng.uniform(interval, 2 * interval))
    called_at = time.monotonic()
    jobs.cancel(job_id)
    cancelled_at = time.monotonic()
    # The server runs in this process: CLOCK_MONOTONIC readings of one clock.
    seen = rig.recorder.wait(path)
    if child.expect("exited").split()[2] != "True":
        raise RuntimeError(f"the child's stream of job {job_id} ended without being cancelled")
    return seen.at - cancelled_at, cancelled_at - called_at, path, seen


def measure_latency(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(e): close latency after a cancel, same process and cross process, at each interval."""
    trials = report.settings.trials
    recorder = CloseRecorder()
    server_loop = LoopThread("bench-close-server")
    stream_loop = LoopThread("bench-stream-loop")
    try:
        server = server_loop.run(start_close_server(recorder))
        port = server.sockets[0].getsockname()[1]
        rig = LatencyRig(f"ws://127.0.0.1:{port}", recorder, stream_loop)
        try:
            for db in dbs:
                for interval in INTERVALS:
                    report.sample_load()
                    jobs = Jobs(db.engine, db.model, interval=interval)
                    same = Latency(db.name, "same process", interval)
                    progress(f"(e) {db.name}, same process, interval {interval}s: {trials} trials")
                    same_process_trial(rig, db, jobs, interval, rng)  # warm-up, unrecorded
                    for _ in range(trials):
                        latency, call, path, seen = same_process_trial(rig, db, jobs, interval, rng)
                        same.samples.append(latency)
                        same.cancel_calls.append(call)
                        check_close(same, path, seen)
                    report.latencies.append(same)

                    cross = Latency(db.name, "another process", interval)
                    progress(
                        f"(e) {db.name}, another process, interval {interval}s: {trials} trials"
                    )
                    script = str(Path(__file__).resolve())
                    args = [script, STREAM_FLAG, db.url, db.model.__tablename__, repr(interval)]
                    child = Child(python_command(*args), "stream subprocess")
                    try:
                        child.expect("ready")
                        # One unrecorded trial: imports, the child's first connection and poll.
                        cross_process_trial(rig, db, jobs, child, interval, rng)
                        for _ in range(trials):
                            latency, call, path, seen = cross_process_trial(
                                rig, db, jobs, child, interval, rng
                            )
                            cross.samples.append(latency)
                            cross.cancel_calls.append(call)
                            check_close(cross, path, seen)
                    finally:
                        child.close()
                    report.latencies.append(cross)
        finally:
            server_loop.run(stop_server(server))
    finally:
        stream_loop.close()
        server_loop.close()


# -- (f) analyze() end to end ---------------------------------------------------------------


async def bare_lockstep(uri: str, frames: list[bytes]) -> Sample:
    """A bare client of the analysis protocol, one frame at a time; timed end to end."""
    started, cpu_started = time.perf_counter(), time.process_time()
    async with connect(uri, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "view": "front", "job": None}))
        results = []
        for index, frame in enumerate(frames):
            await ws.send(frame)
            result = json.loads(await ws.recv())
            if result.get("frame") != index:
                raise RuntimeError(f"out-of-order result {result!r} for frame {index}")
            results.append(result)
        await ws.send(json.dumps({"type": "end"}))
    return Sample(time.perf_counter() - started, time.process_time() - cpu_started, 0)


async def timed_analysis(
    service: MediaAnalysisService, jobs: Jobs, db: Database, frames: list[bytes]
) -> Sample:
    """``analyze()`` inside ``jobs.run()`` (entered before the clock), timed."""
    job_id = await asyncio.to_thread(add_job, db.engine, db.model)
    async with jobs.run(job_id) as cp:
        before = db.statements[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        results = await service.analyze(frames, view="front", checkpoint=cp)
        sample = Sample(
            time.perf_counter() - started,
            time.process_time() - cpu_started,
            db.statements[0] - before,
        )
    if len(results) != len(frames):
        raise RuntimeError(f"expected {len(frames)} results, got {len(results)}")
    return sample


async def measure_analysis_async(
    report: Report, dbs: list[Database], uri: str, rng: random.Random
) -> None:
    """(f): the bare client and ``analyze()`` per database, interleaved, shuffled per round."""
    s = report.settings
    frames = [rng.randbytes(s.frame_bytes) for _ in range(s.frames)]
    service = MediaAnalysisService(uri)

    variants: dict[str, Callable[[], Coroutine[Any, Any, Sample]]] = {
        LOCKSTEP: functools.partial(bare_lockstep, uri, frames)
    }
    dbs_of: dict[str, str] = {}
    for db in dbs:
        jobs = Jobs(db.engine, db.model, interval=THROUGHPUT_INTERVAL)
        variants[analyze_label(db.name)] = functools.partial(
            timed_analysis, service, jobs, db, frames
        )
        dbs_of[analyze_label(db.name)] = db.name
    results = {label: Runs(label, s.frames, dbs_of.get(label)) for label in variants}
    for run in variants.values():  # warm-up
        await run()
    for _ in range(s.analyses):
        order = list(variants)
        rng.shuffle(order)
        for label in order:
            results[label].add(await variants[label]())
    report.analysis = results


def measure_analysis(report: Report, dbs: list[Database], rng: random.Random) -> None:
    """(f) against ``examples/analysis_server.py`` started as a subprocess."""
    server = Child(python_command(str(ANALYSIS_SERVER), "--port", "0"), "analysis server")
    try:
        uri = server.expect("listening on").split()[-1]
        asyncio.run(measure_analysis_async(report, dbs, uri, rng))
    finally:
        server.close(terminate=True)


# -- rendering ---------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    """A rate with thousands separators."""
    return f"{value:,.0f}"


def fmt_pct(value: float) -> str:
    """A signed percentage."""
    return f"{value * 100:+.1f} %"


def fmt_polls(runs: Runs) -> str:
    """The status queries per timed run: median (min, max), or a dash for no database."""
    if runs.db is None:
        return "—"
    return f"{statistics.median(runs.polls):g} (min {min(runs.polls)}, max {max(runs.polls)})"


def render(report: Report) -> str:
    """The whole report as Markdown."""
    s = report.settings
    out = report_head("media", report.header, report.warnings)

    rows: list[list[str]] = []
    bare = report.throughput[BARE]
    for db in report.dbs:
        runs = report.throughput[receive_label(db)]
        over = overhead(runs, bare)
        rows.append(
            [
                f"(d) messages/s through `receive()` vs bare `async for`, {db} checkpoint "
                f"(interval {THROUGHPUT_INTERVAL:g} s)",
                f"{fmt_rate(runs.best_rate)} vs {fmt_rate(bare.best_rate)}: overhead "
                f"{fmt_pct(over)} (paired median {fmt_pct(paired_overhead(runs, bare))}; "
                f"CPU time per message {fmt_pct(cpu_overhead(runs, bare))})",
                f"≤ {OVERHEAD_TARGET * 100:g} % overhead",
                verdict(over <= OVERHEAD_TARGET),
            ]
        )
    if "PostgreSQL" not in report.dbs:
        rows.append(["(d) `receive()` with a PostgreSQL checkpoint", "not measured", "—", "—"])
    for lat in report.latencies:
        closes = f"; {len(lat.bad_closes)} bad closes" if lat.bad_closes else ""
        rows.append(
            [
                f"(e) close latency, {lat.where}, {lat.db}, interval {lat.interval:g} s",
                f"p50 {fmt_ms(lat.pct(0.5))} / p95 {fmt_ms(lat.pct(0.95))} ms "
                f"(max {fmt_ms(max(lat.samples))}; n={len(lat.samples)}{closes})",
                f"p95 ≤ {fmt_ms(lat.target)} ms",
                verdict(lat.met),
            ]
        )
    lockstep = report.analysis[LOCKSTEP]
    for db in report.dbs:
        runs = report.analysis[analyze_label(db)]
        rows.append(
            [
                f"(f) frames/s, `analyze()` vs a bare lock-step client, {db} checkpoint",
                f"{fmt_rate(runs.best_rate)} vs {fmt_rate(lockstep.best_rate)}: "
                f"{fmt_pct(overhead(runs, lockstep))} time (CPU time per frame "
                f"{fmt_pct(cpu_overhead(runs, lockstep))})",
                "— (context)",
                "—",
            ]
        )
    out += table(["row", "measured", "target", "verdict"], rows)

    out += ["", "## (d) messages per second, push server → client on loopback", ""]
    out.append(
        f"{s.messages:,} text messages of {len(MESSAGE)} bytes per run (pre-encoded frames, one "
        f"write: the client is the bottleneck), {s.rounds} runs per variant, interleaved in a "
        "shuffled order per round, after one warm-up run each. Timed from sending `go N` to "
        f"the N-th message. Checkpoints: `Jobs(..., interval={THROUGHPUT_INTERVAL:g})`; "
        '"polls" are the status queries the database received during a timed run. Overhead '
        "is best time ÷ the bare loop's best time - 1; the paired column is the median over "
        "the rounds of the same ratio within one round. CPU is `time.process_time()` of this "
        "process (the client's loop and dbcancel's poller thread; the server is another "
        "process): it leaves out the time other processes held the CPUs, so it is the steadier "
        "comparison on a loaded machine."
    )
    out.append("")
    out += table(
        [
            "variant",
            "best msgs/s",
            "median msgs/s",
            "µs/msg (best)",
            "overhead (best)",
            "overhead (paired median)",
            "CPU µs/msg (best)",
            "CPU overhead (best)",
            "polls per run",
        ],
        [
            [
                label,
                fmt_rate(runs.best_rate),
                fmt_rate(runs.median_rate),
                f"{min(runs.seconds) / runs.count * 1e6:.2f}",
                "—" if runs is bare else fmt_pct(overhead(runs, bare)),
                "—" if runs is bare else fmt_pct(paired_overhead(runs, bare)),
                f"{min(runs.cpu) / runs.count * 1e6:.2f}",
                "—" if runs is bare else fmt_pct(cpu_overhead(runs, bare)),
                fmt_polls(runs),
            ]
            for label, runs in report.throughput.items()
        ],
    )

    out += [
        "",
        "## (e) close latency, `jobs.cancel()` returned → server received the close frame (ms)",
        "",
    ]
    out.append(
        "The server (a websockets server on a thread of this process) sends one `hello`, then "
        "stays silent; it timestamps each close frame with `time.monotonic()` as it parses it. "
        "Same process: the stream runs on an event loop in another thread, `jobs.cancel()` is "
        "called from the main (synchronous) thread. Another process: the stream runs in a "
        "subprocess with its own engine; `CLOCK_MONOTONIC` is system-wide on Linux. Cancel "
        "after a random delay in [interval, 2 x interval] from the stream's first message; one "
        "unrecorded warm-up trial per row. Percentiles are nearest-rank. A negative value "
        "means the close frame arrived before `cancel()` had returned to its caller."
    )
    out.append("")
    out += table(
        [
            "database",
            "stream",
            "interval",
            "n",
            "min",
            "p50",
            "p95",
            "max",
            "target p95",
            'closes 1001 "cancelled"',
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
                f"{len(lat.samples) - len(lat.bad_closes)}/{len(lat.samples)}",
                f"{fmt_ms(nearest_rank(lat.cancel_calls, 0.5))} / {fmt_ms(max(lat.cancel_calls))}",
            ]
            for lat in report.latencies
        ],
    )
    bad = [b for lat in report.latencies for b in lat.bad_closes]
    if bad:
        out += ["", 'Close frames other than 1001 "cancelled": ' + ", ".join(bad[:10])]

    out += ["", "## (f) `analyze()` end to end against `examples/analysis_server.py`", ""]
    out.append(
        f"{s.frames} frames of {s.frame_bytes:,} random bytes per analysis, lock-step (send a "
        f"frame, wait for its JSON result), {s.analyses} analyses per variant, interleaved, after "
        "one warm-up each; the server runs in a subprocess. Timed from connecting to the "
        "connection closed (`jobs.run()` entered before the clock). For context: no target."
    )
    out.append("")
    out += table(
        [
            "variant",
            "best frames/s",
            "median frames/s",
            "ms/analysis (best)",
            "time vs bare (best)",
            "time vs bare (paired median)",
            "CPU µs/frame (best)",
            "CPU vs bare (best)",
            "polls per analysis",
        ],
        [
            [
                label,
                fmt_rate(runs.best_rate),
                fmt_rate(runs.median_rate),
                f"{min(runs.seconds) * 1e3:.1f}",
                "—" if runs is lockstep else fmt_pct(overhead(runs, lockstep)),
                "—" if runs is lockstep else fmt_pct(paired_overhead(runs, lockstep)),
                f"{min(runs.cpu) / runs.count * 1e6:.1f}",
                "—" if runs is lockstep else fmt_pct(cpu_overhead(runs, lockstep)),
                fmt_polls(runs),
            ]
            for label, runs in report.analysis.items()
        ],
    )
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    """A short hash of a file's content, or ``missing``."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def source_hashes() -> dict[str, str]:
    """A hash per source file measured: dbcancel's modules and the analysis server."""
    package = Path(dbcancel.__file__).resolve().parent
    hashes = {
        str(path.relative_to(package.parent)): file_hash(path)
        for path in sorted(package.rglob("*.py"))
    }
    hashes[str(ANALYSIS_SERVER.relative_to(ANALYSIS_SERVER.parents[1]))] = file_hash(
        ANALYSIS_SERVER
    )
    return hashes


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The files added, removed or modified between two :func:`source_hashes`."""
    names = before.keys() | after.keys()
    return sorted(name for name in names if before.get(name) != after.get(name))


def describe(report: Report, dbs: list[Database]) -> None:
    """Fill the report's header line: versions, machine, date, load, mode."""
    h = report.header
    h["Python"] = platform.python_version()
    h["SQLAlchemy"] = sqlalchemy.__version__
    h["psycopg"] = version("psycopg")
    h["websockets"] = version("websockets")
    h["dbcancel"] = f"{dbcancel.__version__} (git {git_state()}, source {source_fingerprint()})"
    h["analysis server"] = f"sha256 {file_hash(ANALYSIS_SERVER)}"
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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PUSH_FLAG]:
        return push_server_main()
    if argv[:1] == [STREAM_FLAG]:
        return child_stream_main(argv[1:])
    args = parse_args(
        argv,
        "Measure dbcancel.media: receive() throughput, close latency after a cancel, "
        "analyze() frames/s.",
    )
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    report = Report(Settings.make(args.quick, args.trials), seed)
    announce(args.quick, "4")
    report.sample_load()
    table_name = f"dbcancel_bench_media_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    hashes = source_hashes()

    with (
        tempfile.TemporaryDirectory(prefix="dbcancel-bench-media-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        dbs = open_databases(stack, args, Path(tmp), table_name)
        if dbs is None:
            return 2
        report.dbs = [db.name for db in dbs]
        describe(report, dbs)
        progress("(d) receive() throughput vs a bare async for")
        measure_throughput(report, dbs, rng)
        report.sample_load()
        measure_latency(report, dbs, rng)
        report.sample_load()
        progress("(f) analyze() vs a bare lock-step client")
        measure_analysis(report, dbs, rng)
        report.sample_load()

    report.header["load avg at end"] = load_average()
    if report.loads:
        report.header["load avg max (sampled per phase)"] = f"{max(report.loads):.2f}"
    report.header["took"] = f"{time.monotonic() - started:.0f} s"
    changed = changed_files(hashes, source_hashes())
    if changed:
        report.warnings.append(
            "source files changed during this run, the numbers may mix versions: "
            + ", ".join(f"`{name}`" for name in changed)
        )
    return finish(render(report))


if __name__ == "__main__":
    sys.exit(main())
