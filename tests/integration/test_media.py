"""dbcancel.media against the real example analysis server, on loopback, on every database.

The server is ``examples/analysis_server.py``: on the test's own event loop
(``AnalysisServer``), on a thread of its own (``running_server``) or as a child process.
Cancels come from the same loop, from a synchronous thread and from another process. Each
async test runs ``asyncio.run`` inside a plain test function, bounded by ``run()``.

Open sockets are counted from ``/proc/self/fd`` (and ``/proc/net/tcp``, to tell which
port a socket talks to), so the tests that count them run on Linux only.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gc
import hashlib
import json
import os
import random
import re
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

pytest.importorskip("websockets")

from sqlalchemy import create_engine, text
from websockets.asyncio.client import connect

from dbcancel import Cancelled, Jobs, Status
from dbcancel.media import MediaAnalysisService, MediaError, receive
from dbcancel.testing import close_watchers
from tests.integration.example_modules import EXAMPLES, SERVER_PATH, load_example
from tests.models import Analysis

analysis_server = load_example(SERVER_PATH)
AnalysisServer = analysis_server.AnalysisServer
running_server = analysis_server.running_server

ROOT = EXAMPLES.parent
FRAMES = [bytes([i]) * (100 + i) for i in range(5)]
HAS_PROC = Path("/proc/self/fd").is_dir() and Path("/proc/net/tcp").is_file()
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="counts sockets through /proc (Linux)")

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    """Run ``test()`` on a fresh event loop; a hang fails after ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await test()

    return asyncio.run(bounded())


def expected_results(frames: Iterable[bytes], view: str) -> list[dict[str, Any]]:
    """What the server answers for ``frames``, in order (see analysis_server.result_message)."""
    return [
        {"frame": i, "view": view, "bytes": len(f), "digest": hashlib.sha256(f).hexdigest()[:16]}
        for i, f in enumerate(frames)
    ]


def start_message(job: int) -> str:
    return json.dumps({"type": "start", "view": "front", "job": job})


def end_message() -> str:
    return json.dumps({"type": "end"})


# -- sockets, counted -------------------------------------------------------------------


def open_sockets() -> set[int]:
    """The inodes of this process's open sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile, e.g. the directory listing's own descriptor
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def tcp_connections(port: int, *, client_only: bool = False) -> list[str]:
    """This process's TCP connections (listeners excluded) to or from ``port``.

    ``client_only``: only those whose remote end is ``port`` (the client's side).
    """
    mine = open_sockets()
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if inode not in mine or state == "0A":  # 0A: LISTEN
                continue
            local_port = int(local.rsplit(":", 1)[1], 16)
            remote_port = int(remote.rsplit(":", 1)[1], 16)
            if remote_port == port or (not client_only and local_port == port):
                found.append(f"{local} -> {remote} (state {state}, inode {inode})")
    return found


# -- child processes --------------------------------------------------------------------


class Child:
    """A Python child process whose stdout is read with deadlines, never a blocking read."""

    def __init__(self, *args: str | Path, stdin: bool = False, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._unread = ""
        self.output = ""

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Wait for ``pattern`` in what the child prints next; consume up to its end."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._unread)
            if match:
                self._unread = self._unread[match.end() :]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} after {timeout} s; stdout: {self.output!r}")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    code, _, err = self.finish(timeout=10)
                    raise AssertionError(
                        f"the child exited ({code}) before printing {pattern!r}; "
                        f"stdout: {self.output!r}; stderr: {err!r}"
                    )
                text_ = self._decoder.decode(chunk)
                self._unread += text_
                self.output += text_

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30, *, terminate: bool = False) -> tuple[int, str, str]:
        """Wait for the child to exit (after SIGTERM if ``terminate``): (code, stdout, stderr)."""
        if terminate and self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=timeout)
        self.output += self._decoder.decode(out, final=True)
        return self.proc.returncode, self.output, err.decode()

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def server_process(*options: str) -> tuple[Child, str]:
    """``examples/analysis_server.py --port 0 OPTIONS`` as a child; returns it and its URI."""
    child = Child(SERVER_PATH, "--port", "0", *options)
    try:
        uri = child.expect(r"^listening on (ws://\S+)$").group(1)
    except BaseException:
        child.__exit__(None, None, None)
        raise
    return child, uri


# A canceller in another process, with its own engine: reads job ids on stdin, cancels
# each, prints "<id> <True|False> <time.monotonic() after cancel() returned>".
# CLOCK_MONOTONIC is system-wide on Linux, so its readings compare with this process's.
CANCELLER = """
import sys, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis

engine = create_engine(sys.argv[1])
jobs = Jobs(engine, Analysis)
with engine.connect():  # connect before "ready": the first cancel is not a cold one
    pass
print("ready", flush=True)
for line in sys.stdin:
    job_id = int(line)
    done = jobs.cancel(job_id, reason="remote")
    print(job_id, done, repr(time.monotonic()), flush=True)
engine.dispose()
"""


class RemoteCanceller(Child):
    """The CANCELLER script in a child process, ready once constructed."""

    def __init__(self, url: str) -> None:
        super().__init__("-c", CANCELLER, url, stdin=True)
        self._lock = threading.Lock()
        try:
            self.expect(r"^ready$")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def cancel(self, job_id: int) -> tuple[bool, float]:
        """Cancel in the child; (its result, its monotonic time when cancel() returned).

        Thread-safe: tasks call it through ``asyncio.to_thread``, one request at a time.
        """
        with self._lock:
            self.send(str(job_id))
            match = self.expect(rf"^{job_id} (True|False) ([0-9.e+-]+)$")
        return match.group(1) == "True", float(match.group(2))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the child's loop ends and it disposes its engine
            with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
                self.proc.wait(timeout=30)
        super().__exit__(exc_type, exc, tb)


# -- assertions on the job row ----------------------------------------------------------


def assert_cancelled(db: Any, job_id: int, reason: str | None = None) -> None:
    row = db.row(job_id)
    assert row is not None
    assert row.status == Status.CANCELLED
    assert row.finished_at is not None, "a cancelled job that has stopped has finished_at"
    assert row.cancel_reason == reason


def assert_failed(db: Any, job_id: int, err: MediaError, uri: str, problem: str) -> None:
    """``err`` names the job and the URI and says ``problem``; the job ended failed with it."""
    assert err.job_id == job_id
    assert err.uri == uri
    message = str(err)
    assert f"job {job_id!r}" in message
    assert uri in message
    assert re.search(problem, message), message
    row = db.row(job_id)
    assert row is not None
    assert row.status == Status.FAILED, "a job whose analysis failed is never left in_progress"
    assert row.finished_at is not None
    assert row.error == f"MediaError: {message}"


async def failing_analysis(
    jobs: Jobs, job_id: int, service: MediaAnalysisService, frames: Any = FRAMES
) -> MediaError:
    """Run ``service.analyze`` in ``jobs.run(job_id)``; return the MediaError it must raise."""
    with pytest.raises(MediaError) as caught:
        async with jobs.run(job_id) as cp:
            await service.analyze(frames, view="front", checkpoint=cp)
    return caught.value


# -- analyze(): results -----------------------------------------------------------------


async def async_frames(frames: list[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        await asyncio.sleep(0)  # a real producer awaits between frames
        yield frame


@pytest.mark.parametrize("kind", ["list", "generator", "async-generator"])
def test_analyze_returns_one_result_per_frame_in_order(db, kind):
    jobs = db.jobs()
    job_id = db.add()
    frames = {
        "list": lambda: list(FRAMES),
        "generator": lambda: (f for f in FRAMES),
        "async-generator": lambda: async_frames(FRAMES),
    }[kind]

    async def test() -> list[dict[str, Any]]:
        async with AnalysisServer(token="s3cret") as server:
            service = MediaAnalysisService(server.uri + "/analyze", token="s3cret")
            async with jobs.run(job_id):
                # No checkpoint= : analyze() finds the job running in this task.
                results = await service.analyze(frames(), view="side")
            assert await server.wait_closed_count(1) == [1000]
            assert server.open_connections == 0
            assert server.auth_headers == ["Bearer s3cret"]
            assert server.paths == ["/analyze"]
            assert server.views == ["side"]
            assert server.jobs == [job_id]
            assert server.frames_received == len(FRAMES)
            return results

    assert run(test) == expected_results(FRAMES, "side")
    row = db.row(job_id)
    assert row is not None
    assert row.status == Status.COMPLETED
    assert row.finished_at is not None


def test_analyze_of_no_frames_returns_no_results(db):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> None:
        async with AnalysisServer() as server:
            async with jobs.run(job_id) as cp:
                service = MediaAnalysisService(server.uri)
                assert await service.analyze([], view="front", checkpoint=cp) == []
            assert await server.wait_closed_count(1) == [1000]

    run(test)
    assert db.row(job_id).status == Status.COMPLETED


# -- cancelling analyze() ---------------------------------------------------------------


def test_cancel_while_the_server_is_silent_closes_with_1001(db):
    jobs = db.jobs()
    job_id = db.add()
    raised: list[Cancelled] = []

    async def worker(service: MediaAnalysisService) -> None:
        async with jobs.run(job_id) as cp:
            try:
                await service.analyze(FRAMES, view="front", checkpoint=cp)
            except Cancelled as exc:
                raised.append(exc)
                raise
            raise AssertionError("analyze() returned from a silent server")

    async def test() -> float:
        async with AnalysisServer(silent=True) as server:
            service = MediaAnalysisService(server.uri, receive_timeout=30)
            task = asyncio.create_task(worker(service))
            # The first frame is in and the client now waits for a result that never comes.
            await server.wait_frames_received(1)
            assert not task.done()
            closed_at: list[float] = []
            closing = asyncio.create_task(server.wait_closed_count(1, timeout=10))
            closing.add_done_callback(lambda _: closed_at.append(time.monotonic()))

            def cancel() -> float:
                assert jobs.cancel(job_id, reason="user asked")
                return time.monotonic()

            # Off the loop, as an async web handler would cancel: the loop never waits on the DB.
            returned = await asyncio.to_thread(cancel)
            assert await closing == [1001]
            await task  # jobs.run() swallowed the job's own Cancelled
            assert server.close_reasons == ["cancelled"]
            assert server.open_connections == 0
            assert server.frames_received == 1
            return closed_at[0] - returned

    latency = run(test)
    print(
        f"\ncancel -> close, cancel() on a worker thread of the same loop: {latency * 1e3:.1f} ms"
    )
    assert latency < 1.0
    assert len(raised) == 1
    assert (raised[0].job_id, raised[0].reason) == (job_id, "user asked")
    assert_cancelled(db, job_id, "user asked")


def test_a_job_cancelled_before_analyze_never_connects(db):
    jobs = db.jobs()
    job_id = db.add()
    assert jobs.cancel(job_id)

    async def test() -> None:
        async with AnalysisServer() as server:
            with pytest.raises(Cancelled):
                async with jobs.run(job_id) as cp:
                    await MediaAnalysisService(server.uri).analyze(
                        FRAMES, view="front", checkpoint=cp
                    )
            assert server.connections_total == 0

    run(test)
    assert_cancelled(db, job_id)


def test_cancel_between_frames_stops_the_stream_and_leaves_no_task(db):
    """A cancel seen right before a frame is sent: no more frames, 1001, no stray task."""
    jobs = db.jobs()
    job_id = db.add()
    closed: list[str] = []

    async def frames() -> AsyncIterator[bytes]:
        try:
            for i, frame in enumerate(FRAMES):
                yield frame
                if i == 2:
                    # Synchronous, on the loop's own thread (a blocking DB call, acceptable
                    # in a test): the cancel callbacks run right here, then analyze() finds
                    # the flag before it sends frame 3, without awaiting anything in between.
                    jobs.cancel(job_id)
        finally:
            closed.append("frames closed")

    async def test() -> None:
        with running_server() as server:  # its own thread: this loop has only the client's tasks
            service = MediaAnalysisService(server.uri)
            async with jobs.run(job_id) as cp:
                with pytest.raises(Cancelled):
                    await service.analyze(frames(), view="front", checkpoint=cp)
                # Closed when analyze() returns, not later by the loop's finalizer in a task.
                assert closed == ["frames closed"]
                # Neither a late close task nor the poller outlives the stream.
                assert asyncio.all_tasks() == {asyncio.current_task()}
            assert await server.wait_closed_count(1) == [1001]
            assert server.close_reasons == ["cancelled"]
            assert server.frames_received == 3

    run(test)
    assert_cancelled(db, job_id)


def test_cancel_from_a_synchronous_thread_closes_the_connection_on_another_loop(db):
    """Like a Flask request: jobs.cancel() in a plain thread, the stream on another thread's
    loop. The interval is long, so only the local path (no poll) can be this fast."""
    jobs = db.jobs(interval=30)
    job_id = db.add()
    outcome: dict[str, BaseException] = {}

    def worker(uri: str) -> None:
        async def main() -> None:
            async with jobs.run(job_id) as cp:
                try:
                    await MediaAnalysisService(uri, receive_timeout=60).analyze(
                        FRAMES, view="front", checkpoint=cp
                    )
                except Cancelled as exc:
                    outcome["cancelled"] = exc
                    raise

        try:
            asyncio.run(main())
        except BaseException as exc:
            outcome["error"] = exc

    with running_server(silent=True) as server:
        thread = threading.Thread(target=worker, args=(server.uri,), daemon=True)
        thread.start()
        try:
            server.wait_frames_received_sync(1, timeout=30)
            assert jobs.cancel(job_id, reason="from flask")
            returned = time.monotonic()
            assert server.wait_closed_count_sync(1, timeout=5) == [1001]
            latency = time.monotonic() - returned
        finally:
            if thread.is_alive():
                jobs.cancel(job_id)  # whatever failed above, let the worker end
            thread.join(30)
        assert not thread.is_alive()
        assert server.close_reasons == ["cancelled"]
    print(f"\ncancel -> close, cancel() in a synchronous thread: {latency * 1e3:.1f} ms")
    assert latency < 1.0  # the target is 100 ms; generous here against a loaded CI
    assert "error" not in outcome, outcome.get("error")
    assert outcome["cancelled"].reason == "from flask"
    assert_cancelled(db, job_id, "from flask")


@pytest.mark.parametrize("watch", [False, True], ids=["inline", "watched"])
def test_cancel_from_another_process_closes_within_the_interval(db, watch):
    interval = 0.05
    jobs = db.jobs(interval=interval, watch=watch)
    job_id = db.add()

    async def test(remote: RemoteCanceller) -> float:
        async with AnalysisServer(silent=True) as server:
            service = MediaAnalysisService(server.uri, receive_timeout=60)

            async def worker() -> None:
                async with jobs.run(job_id) as cp:
                    await service.analyze(FRAMES, view="front", checkpoint=cp)

            task = asyncio.create_task(worker())
            await server.wait_frames_received(1)
            closed_at: list[float] = []
            closing = asyncio.create_task(server.wait_closed_count(1, timeout=10))
            closing.add_done_callback(lambda _: closed_at.append(time.monotonic()))
            done, cancelled_at = await asyncio.to_thread(remote.cancel, job_id)
            assert done
            assert await closing == [1001]
            await task
            assert server.close_reasons == ["cancelled"]
            return closed_at[0] - cancelled_at

    with RemoteCanceller(db.url) as remote:
        latency = run(lambda: test(remote))
    print(f"\ncancel -> close, cancel() in another process: {latency * 1e3:.1f} ms")
    assert latency < interval + 1.0
    assert_cancelled(db, job_id, "remote")


# -- receive() --------------------------------------------------------------------------


def test_receive_yields_the_messages_of_a_bare_connection(db):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> list[Any]:
        async with AnalysisServer() as server:
            async with connect(server.uri) as ws, jobs.run(job_id) as cp:
                if HAS_PROC:  # the socket counter sees a live connection from both ends
                    assert len(tcp_connections(server.port, client_only=True)) == 1
                    assert len(tcp_connections(server.port)) == 2
                await ws.send(start_message(job_id))
                for frame in FRAMES:
                    await ws.send(frame)
                await ws.send(end_message())
                # The server answers, then closes with 1000: the iteration just ends.
                messages = [json.loads(m) async for m in receive(ws, cp)]
            assert await server.wait_closed_count(1) == [1000]
            return messages

    assert run(test) == [*expected_results(FRAMES, "front"), {"type": "done", "frames": 5}]
    assert db.row(job_id).status == Status.COMPLETED


def test_receive_stops_on_cancel_while_the_server_is_silent(db):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> None:
        async with AnalysisServer(silent=True) as server:
            async with connect(server.uri) as ws, jobs.run(job_id) as cp:
                await ws.send(start_message(job_id))
                await ws.send(FRAMES[0])
                received: list[str | bytes] = []

                async def consume() -> None:
                    async for message in receive(ws, cp):
                        received.append(message)

                task = asyncio.create_task(consume())
                await server.wait_frames_received(1)
                assert not task.done()
                assert await asyncio.to_thread(jobs.cancel, job_id, reason="stop")
                with pytest.raises(Cancelled) as raised:
                    await task
                assert raised.value.job_id == job_id
                assert received == []
            assert await server.wait_closed_count(1) == [1001]
            assert server.close_reasons == ["cancelled"]
            assert server.open_connections == 0

    run(test)
    assert_cancelled(db, job_id, "stop")


def test_receive_of_an_already_cancelled_job_closes_at_once(db):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> None:
        async with AnalysisServer() as server, connect(server.uri) as ws:
            async with jobs.run(job_id) as cp:
                await ws.send(start_message(job_id))
                await asyncio.to_thread(jobs.cancel, job_id)

                async def consume() -> None:
                    async for _ in receive(ws, cp):
                        raise AssertionError("a cancelled job's receive() yielded")

                with pytest.raises(Cancelled):
                    await consume()
            assert await server.wait_closed_count(1) == [1001]

    run(test)
    assert_cancelled(db, job_id)


# -- many streams -----------------------------------------------------------------------


@needs_proc
def test_100_streams_cancelled_at_random_moments_leave_nothing_behind(db):
    """100 streams on one loop; 70 are cancelled at a random frame and moment, by this
    process or by another one; 30 complete. Every connection ends closed, with the code
    its outcome calls for, and no task, socket or running job is left behind."""
    count, short_stream, endless = 100, 12, 100_000
    rng = random.Random(20261128)
    # Its own engine, disposed at the end, so that its pooled connections do not count as
    # sockets left behind.
    engine = create_engine(db.url, pool_size=10, max_overflow=10)
    jobs = Jobs(engine, Analysis, interval=0.05)
    ids = [db.add() for _ in range(count)]
    # job -> (canceller, frame after which to cancel, extra delay); None: completes.
    # A cancelled job streams endlessly, so that only its cancel can end it, however
    # slow the machine: each outcome is then known, and so is each close code.
    plan = {
        job: (rng.choice(["local", "remote"]), rng.randrange(short_stream), rng.uniform(0, 0.05))
        if rng.random() < 0.7
        else None
        for job in ids
    }
    cancelled = {job for job, p in plan.items() if p is not None}
    frame = b"\x07" * 512
    returned: set[int] = set()
    raised: set[int] = set()

    async def one(service: MediaAnalysisService, remote: RemoteCanceller, job_id: int) -> None:
        moment = asyncio.Event()
        step = plan[job_id]

        async def frames() -> AsyncIterator[bytes]:
            for i in range(short_stream if step is None else endless):
                yield frame
                if step is not None and i == step[1]:
                    moment.set()

        async def canceller(by: str, delay: float) -> None:
            await moment.wait()
            await asyncio.sleep(delay)  # the random moment, not a synchronisation
            if by == "remote":  # seen by the poller, within its interval
                done, _ = await asyncio.to_thread(remote.cancel, job_id)
            else:  # reaches the loop at once through the registry
                done = await asyncio.to_thread(jobs.cancel, job_id, reason="local")
            assert done

        cancelling = None if step is None else asyncio.create_task(canceller(step[0], step[2]))
        try:
            async with jobs.run(job_id) as cp:
                try:
                    results = await service.analyze(frames(), view="front", checkpoint=cp)
                except Cancelled:
                    raised.add(job_id)
                    raise
                assert [r["frame"] for r in results] == list(range(short_stream))
                returned.add(job_id)
        finally:
            if cancelling is not None:
                await cancelling

    async def test(server: Any, remote: RemoteCanceller) -> None:
        service = MediaAnalysisService(server.uri, receive_timeout=30)
        await asyncio.gather(*(one(service, remote, job) for job in ids))
        codes = await server.wait_closed_count(count, timeout=30)
        assert server.connections_total == count
        assert server.open_connections == 0
        assert tcp_connections(server.port) == []
        # The poller ended with the last stream; nothing else was left running.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert sorted(codes, key=str) == sorted(
            [1001] * len(cancelled) + [1000] * (count - len(cancelled)), key=str
        )
        reasons = [r for c, r in zip(codes, server.close_reasons, strict=True) if c == 1001]
        assert reasons == ["cancelled"] * len(cancelled)

    with running_server(delay=0.005) as server, RemoteCanceller(db.url) as remote:
        before = open_sockets()
        try:
            run(lambda: test(server, remote))
        finally:
            engine.dispose()
        # The watcher keeps its listener a few seconds after its last job: close it
        # now, as a suite's teardown would.
        close_watchers()
        after = open_sockets()
        # Only new sockets count: one open before may close meanwhile (the listener of
        # an earlier test's watcher, closed above or once idle a few seconds).
        assert after - before == set(), f"sockets left: {sorted(after - before)}"

    assert raised == cancelled
    assert returned == set(ids) - cancelled
    assert 50 <= len(cancelled) <= 90  # the seed gives both kinds in numbers
    for job_id in ids:
        step = plan[job_id]
        if step is None:
            row = db.row(job_id)
            assert row is not None
            assert row.status == Status.COMPLETED
            assert row.finished_at is not None
        else:
            assert_cancelled(db, job_id, step[0])
    assert not jobs.active()


@pytest.mark.serial
def test_event_loop_stall_p99_under_25ms_with_50_streams(db):
    """The loop stays responsive while 50 streams run, the poller polls every 20 ms and
    another process cancels half of them: a 5 ms ticker is late by < 25 ms at p99.

    Measured at 2-17 ms on a shared 2-core machine (above 10 ms under load, so a 10 ms
    bound failed CI runs); a database round trip per stream on the loop, the breakage
    this guards against, stalls it for 50 round trips every 20 ms.

    The server is a child process, so its work is not this loop's. The window opens once
    every stream has its first result (the steady state, not the 50 connects) and closes
    when the remotely cancelled half has ended: their polls, closes and run() exits are in.
    """
    count, tick = 50, 0.005
    jobs = db.jobs(interval=0.02)
    ids = [db.add() for _ in range(count)]
    remote_ids, local_ids = ids[: count // 2], ids[count // 2 :]
    frame = b"\x01" * 1024
    lateness: list[float] = []

    async def test(uri: str, remote: RemoteCanceller) -> None:
        service = MediaAnalysisService(uri, receive_timeout=30)
        flowing = {job: asyncio.Event() for job in ids}

        async def frames(job_id: int) -> AsyncIterator[bytes]:
            for _ in range(100_000):  # far more than fit in the test: only a cancel ends it
                yield frame
                flowing[job_id].set()  # a first result came back

        async def stream(job_id: int) -> None:
            async with jobs.run(job_id) as cp:
                await service.analyze(frames(job_id), view="front", checkpoint=cp)
            assert cp.cancelled

        streams = {job: asyncio.create_task(stream(job)) for job in ids}
        await asyncio.gather(*(event.wait() for event in flowing.values()))

        # The garbage of earlier tests in this process is collected now, not as one long
        # generation-2 pause inside the window (a full-suite run saw 149 ms): that would
        # measure the suite's heap, not dbcancel.
        gc.collect()
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                began = loop.time()
                await asyncio.sleep(tick)
                lateness.append(loop.time() - began - tick)

        ticking = asyncio.create_task(ticker())
        for job_id in remote_ids:
            await asyncio.sleep(0.04)  # the canceller's pace, not a synchronisation
            done, _ = await asyncio.to_thread(remote.cancel, job_id)
            assert done
        await asyncio.gather(*(streams[job] for job in remote_ids))
        stop.set()
        await ticking
        for job_id in local_ids:
            assert not streams[job_id].done()
            await asyncio.to_thread(jobs.cancel, job_id)
        await asyncio.gather(*streams.values())

    server, uri = server_process("--delay", "0.02")
    with server, RemoteCanceller(db.url) as remote:
        run(lambda: test(uri, remote))
    for job_id in remote_ids:
        assert_cancelled(db, job_id, "remote")
    for job_id in local_ids:
        assert_cancelled(db, job_id)

    samples = sorted(lateness)
    p50 = samples[len(samples) // 2]
    p99 = samples[max(0, -(-len(samples) * 99 // 100) - 1)]
    print(
        f"\nticker lateness over {len(samples)} ticks: p50 {p50 * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms, max {samples[-1] * 1e3:.2f} ms"
    )
    assert len(samples) >= 100
    assert p99 < 0.025


# -- faults -----------------------------------------------------------------------------


SERVER_FAULTS = [
    pytest.param(
        {"drop_after": 2},
        {},
        r"the server closed the connection mid-stream",
        [None],
        id="closed-mid-stream",
    ),
    pytest.param(
        {"garbage": True},
        {},
        r"the result for frame 0 is not JSON: 'not json'",
        [1000],
        id="not-json",
    ),
    pytest.param(
        {"out_of_order": True},
        {},
        r"out-of-order result: expected frame 0, got 1",
        [1000],
        id="out-of-order",
    ),
    pytest.param(
        {"silent": True},
        {"receive_timeout": 0.2},
        r"no result within receive_timeout=0.2s",
        [1000],
        id="silent-receive-timeout",
    ),
    pytest.param(
        {"token": "s3cret"},
        {"token": "wrong"},
        r"handshake refused: .*401",
        [],
        id="token-refused",
    ),
]


@needs_proc
@pytest.mark.parametrize(("server_options", "service_options", "problem", "codes"), SERVER_FAULTS)
def test_server_fault_fails_the_job_naming_job_and_uri(
    db, server_options, service_options, problem, codes
):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> tuple[MediaError, str]:
        async with AnalysisServer(**server_options) as server:
            service = MediaAnalysisService(server.uri, **service_options)
            err = await failing_analysis(jobs, job_id, service)
            assert tcp_connections(server.port, client_only=True) == []
            assert await server.wait_closed_count(len(codes)) == codes
            assert server.open_connections == 0
            assert tcp_connections(server.port) == []
            return err, server.uri

    err, uri = run(test)
    assert_failed(db, job_id, err, uri, problem)


@pytest.mark.parametrize(
    "uri",
    ["ws://", "ws:///analyze", "ws://127.0.0.1:99999", "ws://127.0.0.1:http", "ws://[::1"],
)
def test_malformed_uri_fails_the_job_naming_job_and_uri(db, uri):
    jobs = db.jobs()
    job_id = db.add()
    err = run(lambda: failing_analysis(jobs, job_id, MediaAnalysisService(uri)))
    assert_failed(db, job_id, err, uri, r"invalid URI")


@needs_proc
def test_refused_connection_fails_the_job_naming_job_and_uri(db):
    jobs = db.jobs()
    job_id = db.add()
    # Bound but not listening: a connection to it is refused, and no one else can take it.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        uri = f"ws://127.0.0.1:{port}/analyze"

        async def test() -> MediaError:
            err = await failing_analysis(jobs, job_id, MediaAnalysisService(uri))
            assert tcp_connections(port) == []
            return err

        err = run(test)
    assert isinstance(err.__cause__, ConnectionRefusedError)
    assert_failed(db, job_id, err, uri, r"cannot connect: ")


@needs_proc
def test_handshake_timeout_fails_the_job_naming_job_and_uri(db):
    jobs = db.jobs()
    job_id = db.add()
    # A TCP server that never answers: the kernel completes the TCP handshake into the
    # backlog, and nothing ever reads the HTTP request.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as mute:
        port = mute.getsockname()[1]
        uri = f"ws://127.0.0.1:{port}"

        async def test() -> MediaError:
            began = time.monotonic()
            err = await failing_analysis(jobs, job_id, MediaAnalysisService(uri, open_timeout=0.2))
            assert time.monotonic() - began < 5
            assert tcp_connections(port, client_only=True) == []
            return err

        err = run(test)
    assert_failed(db, job_id, err, uri, r"no handshake within open_timeout=0.2s")


@needs_proc
def test_cancel_during_a_slow_handshake_does_not_wait_for_open_timeout(db):
    """A cancel from a synchronous thread while the handshake hangs ends analyze() at once."""
    jobs = db.jobs(interval=30)  # only the local path can be this fast
    job_id = db.add()
    with socket.create_server(("127.0.0.1", 0), backlog=8) as mute:
        port = mute.getsockname()[1]
        service = MediaAnalysisService(f"ws://127.0.0.1:{port}", open_timeout=30)

        async def test() -> float:
            loop = asyncio.get_running_loop()
            async with jobs.run(job_id) as cp:
                connecting = asyncio.Event()
                # The handshake request reaches the mute server's backlog: then cancel.
                canceller = threading.Thread(
                    target=lambda: (
                        asyncio.run_coroutine_threadsafe(connecting.wait(), loop).result(10),
                        jobs.cancel(job_id, reason="user left"),
                    ),
                    daemon=True,
                )
                canceller.start()
                loop.call_later(0.05, connecting.set)
                began = time.monotonic()
                await service.analyze(FRAMES, view="front", checkpoint=cp)
            canceller.join(10)
            assert tcp_connections(port, client_only=True) == []
            return time.monotonic() - began

        elapsed = run(test)
    assert elapsed < 5, f"analyze() waited {elapsed:.1f}s: the cancel waited for open_timeout"
    assert_cancelled(db, job_id, "user left")


# -- bad input --------------------------------------------------------------------------


def test_a_frame_that_is_not_bytes_fails_the_job_and_closes_the_connection(db):
    jobs = db.jobs()
    job_id = db.add()

    async def test() -> None:
        async with AnalysisServer() as server:
            service = MediaAnalysisService(server.uri)
            with pytest.raises(TypeError, match="frames must be bytes, got str"):
                async with jobs.run(job_id) as cp:
                    await service.analyze([FRAMES[0], "text"], view="front", checkpoint=cp)
            assert await server.wait_closed_count(1) == [1000]
            assert server.open_connections == 0
            assert server.frames_received == 1

    run(test)
    row = db.row(job_id)
    assert row.status == Status.FAILED
    assert row.finished_at is not None
    assert row.error == "TypeError: frames must be bytes, got str"


def test_analyze_needs_a_checkpoint_and_a_string_view(db):
    service = MediaAnalysisService("ws://127.0.0.1:9")  # never reached
    with pytest.raises(TypeError, match="needs a checkpoint"):
        run(lambda: service.analyze(FRAMES, view="front"))

    jobs = db.jobs()
    job_id = db.add()

    async def test() -> None:
        async with jobs.run(job_id) as cp:
            with pytest.raises(TypeError, match="view must be a string"):
                await service.analyze(FRAMES, view=3, checkpoint=cp)  # type: ignore[arg-type]

    run(test)
    assert db.row(job_id).status == Status.COMPLETED


@pytest.mark.parametrize(
    ("uri", "options"),
    [
        pytest.param("http://127.0.0.1:8765", {}, id="http-scheme"),
        pytest.param("127.0.0.1:8765", {}, id="no-scheme"),
        pytest.param(b"ws://127.0.0.1:8765", {}, id="bytes"),
        pytest.param("ws://127.0.0.1:8765", {"open_timeout": 0}, id="open_timeout-0"),
        pytest.param("ws://127.0.0.1:8765", {"receive_timeout": -1}, id="receive_timeout-neg"),
        pytest.param("ws://127.0.0.1:8765", {"close_timeout": 0.0}, id="close_timeout-0"),
    ],
)
def test_service_refuses_bad_arguments(uri, options):
    with pytest.raises(ValueError, match=r"ws://|timeout"):
        MediaAnalysisService(uri, **options)


def test_media_without_websockets_names_the_extra():
    script = (
        "import sys\n"
        "sys.modules['websockets'] = None  # as if it were not installed\n"
        "import dbcancel\n"
        "try:\n"
        "    import dbcancel.media\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc, sep=': ')\n"
        "    print('cause:', type(exc.__cause__).__name__)\n"
        "else:\n"
        "    print('imported')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ImportError: "), proc.stdout
    assert "pip install 'dbcancel[media]'" in lines[0]
    assert lines[1] == "cause: ModuleNotFoundError"


# -- the example worker, end to end -----------------------------------------------------


def media_row(url: str, job_id: int) -> tuple[str, Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            status, finished_at = conn.execute(
                text("SELECT status, finished_at FROM media_analysis WHERE id = :id"),
                {"id": job_id},
            ).one()
    finally:
        engine.dispose()
    return status, finished_at


@pytest.mark.parametrize("mode", [[], ["--watch"]], ids=["inline", "watched"])
def test_media_worker_is_cancelled_from_the_command_line(tmp_path, mode):
    url = f"sqlite:///{tmp_path / 'media.db'}"
    server, uri = server_process("--delay", "0.02", "-v")
    with server:
        worker_args = [EXAMPLES / "media_worker.py", "--url", url, "--server", uri, *mode]
        worker_args += ["--fps", "0", "--frames", "1000", "--frame-size", "1024"]
        with Child(*worker_args, "--interval", "0.1", cwd=tmp_path) as worker:
            job_id = int(worker.expect(r"^job (\d+): cancel it from another terminal with$")[1])
            command = worker.expect(r"^  (python -m dbcancel cancel .+)$")[1]
            assert shlex.split(command) == [
                *("python", "-m", "dbcancel", "cancel", str(job_id)),
                *("--url", url, "--table", "media_analysis"),
            ]
            worker.expect(r"\] [1-9]\d*/1000 frames")  # streaming: results are coming back
            cancel = subprocess.run(
                [sys.executable, *shlex.split(command)[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
                check=False,
            )
            assert cancel.returncode == 0, cancel.stdout + cancel.stderr
            assert "cancelled (it was in progress" in cancel.stdout
            code, out, err = worker.finish(timeout=30)
        assert code == 3, out + err
        assert f"job {job_id} cancelled after " in out
        assert "connection closed with 1001" in out
        assert "Traceback" not in err
        server_code, _, server_log = server.finish(timeout=30, terminate=True)
    assert server_code == 0, server_log
    assert "connection closed: code=1001 reason='cancelled'" in server_log
    status, finished_at = media_row(url, job_id)
    assert status == "cancelled"
    assert finished_at is not None


def test_media_worker_completes_a_short_stream(tmp_path):
    url = f"sqlite:///{tmp_path / 'media.db'}"
    server, uri = server_process("--delay", "0.02")
    with server:
        worker = subprocess.run(
            [
                *(sys.executable, EXAMPLES / "media_worker.py"),
                *("--url", url, "--server", uri, "--fps", "0", "--frames", "5"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    job_id = int(re.search(r"^job (\d+): cancel it", worker.stdout, re.M)[1])
    assert f"job {job_id} completed: 5 results" in worker.stdout
    assert "5/5 frames" in worker.stdout
    status, finished_at = media_row(url, job_id)
    assert status == "completed"
    assert finished_at is not None
