"""`AsyncJobs` on a real loop and real databases: what the contract tests cannot show
through their synchronous face.

Each test runs its own loop (`asyncio.run`) with an AsyncEngine made inside it, on
aiosqlite, asyncpg, psycopg's async mode and aiomysql. The loop-blocking probe
(`test_the_loop_is_never_blocked`) bounds the ticker's largest gap while dbcancel's
calls run to twice its gap on the same loop without them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dbcancel import AsyncJobs, Cancelled, Jobs, Status
from tests.aio import TRIALS, assert_not_blocked, async_engine, probe
from tests.conftest import Database, open_database
from tests.models import Analysis, Result

_T = TypeVar("_T")

CASES = [
    pytest.param(("sqlite", "sqlite"), marks=pytest.mark.sqlite, id="aiosqlite"),
    pytest.param(("postgresql", "asyncpg"), marks=pytest.mark.postgresql, id="asyncpg"),
    pytest.param(("postgresql", "psycopg"), marks=pytest.mark.postgresql, id="psycopg-async"),
    pytest.param(("mariadb", "mariadb"), marks=pytest.mark.mariadb, id="aiomysql"),
]
PG_DRIVERS = ("asyncpg", "psycopg")
TIMEOUT = 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def drivers(*names: str) -> Callable[[_T], _T]:
    """Run the test on these drivers only (by default on every one)."""

    def mark(fn: _T) -> _T:
        fn.drivers = names  # type: ignore[attr-defined]
        return fn

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "driver" not in metafunc.fixturenames:
        return
    wanted = getattr(metafunc.function, "drivers", None)
    cases = [c for c in CASES if wanted is None or c.values[0][1] in wanted]
    metafunc.parametrize("case", cases, indirect=True, scope="session")


@pytest.fixture(scope="session")
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Database, str]]:
    """A database of the session's own (see tests/conftest.py) and an async driver."""
    name, driver = request.param
    with open_database(name, tmp_path_factory) as database:
        yield database, driver


@pytest.fixture
def driver(case: tuple[Database, str]) -> str:
    return case[1]


@pytest.fixture
def db(case: tuple[Database, str]) -> Iterator[Database]:
    """The case's database, emptied after each test."""
    database = case[0]
    yield database
    with database.engine.begin() as conn:
        conn.execute(delete(Result))
        conn.execute(delete(Analysis))


def arun(
    db: Database, driver: str, body: Callable[[AsyncJobs], Awaitable[_T]], **kwargs: Any
) -> _T:
    """Run `body(jobs)` on a new loop, with an AsyncJobs on an AsyncEngine made there."""

    async def main() -> _T:
        engine = async_engine(db.url, driver)
        try:
            kwargs.setdefault("interval", 0.05)
            return await body(AsyncJobs(engine, Analysis, **kwargs))
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def forever(cp: Any, started: asyncio.Event | None = None) -> None:
    """A worker loop: a checkpoint per item, an await per item."""
    if started is not None:
        started.set()
    while True:
        cp()
        await asyncio.sleep(0.002)


# -- the loop is never blocked -------------------------------------------------------


@pytest.mark.serial
def test_the_loop_is_never_blocked(db, driver):
    """While 20 jobs run, their rows are read, cancelled, waited for and reaped: the
    ticker's largest gap stays within twice its gap while the jobs run alone."""
    batches = [[db.add() for _ in range(20)] for _ in range(TRIALS)]

    async def body(jobs: AsyncJobs) -> None:
        async def work(job: int, started: asyncio.Event) -> None:
            async with jobs.run(job) as cp:
                await forever(cp, started)

        await jobs.status(batches[0][0])  # resolves the table: not the part under test

        async def calls(trial: int) -> None:
            ids = batches[trial]
            for job in ids:
                assert await jobs.status(job) is Status.IN_PROGRESS
            for job in ids[:10]:
                assert await jobs.cancel(job, reason="probe") is True
                assert await jobs.wait(job, timeout=TIMEOUT) is Status.CANCELLED
            assert await jobs.cancel_where(user_id=f"batch{trial}") == 10
            for job in ids[10:]:
                assert await jobs.wait(job, timeout=TIMEOUT) is Status.CANCELLED
            assert await jobs.reap(60) == 0

        async def trial(number: int) -> Callable[[], Awaitable[object]]:
            events = [asyncio.Event() for _ in batches[number]]
            tasks = [
                asyncio.create_task(work(j, e))
                for j, e in zip(batches[number], events, strict=True)
            ]
            for event in events:
                await event.wait()

            async def measured() -> None:
                await calls(number)
                await asyncio.gather(*tasks)

            return measured

        results = await probe(trial)
        assert_not_blocked(results, "20 running jobs were cancelled and waited for")

    for number, ids in enumerate(batches):
        with db.engine.begin() as conn:
            conn.execute(
                update(Analysis.__table__)
                .where(Analysis.id.in_(ids))
                .values(user_id=f"batch{number}")
            )
    arun(db, driver, body)


# -- polls, pushes and the registry ------------------------------------------------------


def test_a_cancel_behind_its_back_is_seen_at_the_next_poll(db, driver):
    job, gone = db.add(), db.add()

    async def body(jobs: AsyncJobs) -> None:
        async with jobs.run(job) as cp:
            with db.engine.begin() as conn:  # another process's write, no notification
                conn.execute(
                    update(Analysis.__table__)
                    .where(Analysis.id == job)
                    .values(status=Status.CANCELLED, cancel_reason="elsewhere")
                )
            with pytest.raises(Cancelled) as info:
                async with asyncio.timeout(TIMEOUT):
                    await forever(cp)
            assert info.value.reason == "elsewhere"
        async with jobs.run(gone) as cp:
            with db.engine.begin() as conn:
                conn.execute(Analysis.__table__.delete().where(Analysis.id == gone))
            with pytest.raises(Cancelled) as info:
                async with asyncio.timeout(TIMEOUT):
                    await forever(cp)
            assert info.value.reason == "deleted"
        assert jobs.stats().polls >= 2
        assert jobs.active() == ()

    arun(db, driver, body)
    row = db.row(job)
    assert row is not None
    assert (row.status, row.finished_at is not None) == (Status.CANCELLED, True)
    assert db.row(gone) is None


CANCEL_SCRIPT = """
import sys
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
engine = create_engine(sys.argv[1])
print(Jobs(engine, Analysis).cancel(int(sys.argv[2]), reason="from another process"))
"""


@drivers(*PG_DRIVERS)
def test_a_cancel_from_another_process_arrives_by_notify(db, driver):
    """At an interval of 60 s a poll would come far too late: the loop's listener
    flips the checkpoint when the other process's cancel commits."""
    job = db.add()

    async def body(jobs: AsyncJobs) -> None:
        async with jobs.run(job) as cp:
            seen = asyncio.Event()
            cp.on_cancel(seen.set)
            async with asyncio.timeout(TIMEOUT):
                while not jobs.stats().listening:
                    await asyncio.sleep(0.01)
            polls = jobs.stats().polls  # counted per table in this process, since it began
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CANCEL_SCRIPT, db.url, str(job), cwd=ROOT
            )
            assert await proc.wait() == 0
            async with asyncio.timeout(5):
                await seen.wait()
            assert cp.reason == "from another process"
            assert jobs.stats().polls - polls <= 1  # the one that follows LISTEN, at most

    arun(db, driver, body, interval=60)
    row = db.row(job)
    assert row is not None
    assert row.status is Status.CANCELLED


@drivers(*PG_DRIVERS)
def test_the_end_of_a_job_elsewhere_wakes_wait_by_notify(db, driver):
    """A job run by another process: `await jobs.wait()` returns when its end is
    announced, not at a poll of the row (1 s apart at most; here it is woken)."""
    job = db.add()
    sync = Jobs(db.engine, Analysis, interval=60)
    started, release = threading.Event(), threading.Event()

    def worker() -> None:
        with sync.run(job):
            started.set()
            release.wait(TIMEOUT)

    thread = threading.Thread(target=worker, daemon=True)

    async def body(jobs: AsyncJobs) -> float:
        thread.start()
        await asyncio.to_thread(started.wait, TIMEOUT)
        waiter = asyncio.create_task(jobs.wait(job, timeout=TIMEOUT))
        await asyncio.sleep(1.5)  # the wait's reads back off to 1 s apart
        t0 = time.monotonic()
        release.set()
        assert await waiter is Status.COMPLETED
        return time.monotonic() - t0

    took = arun(db, driver, body, interval=60)
    thread.join(TIMEOUT)
    assert took < 0.5, took


def test_jobs_and_async_jobs_share_the_running_jobs(db, driver):
    """A cancel through either side reaches a job run by the other at once: before the
    cancel returns, without a poll (interval 60 s)."""
    threaded, looped = db.add(), db.add()
    sync = Jobs(db.engine, Analysis, interval=60)
    entered, seen = threading.Event(), threading.Event()

    def worker() -> None:
        with sync.run(threaded) as cp:
            cp.on_cancel(seen.set)
            entered.set()
            while True:
                cp()
                time.sleep(0.001)

    thread = threading.Thread(target=worker, daemon=True)

    async def body(jobs: AsyncJobs) -> None:
        thread.start()
        await asyncio.to_thread(entered.wait, TIMEOUT)
        assert await jobs.status(threaded) is Status.IN_PROGRESS
        assert [a.job_id for a in jobs.active()] == [threaded]  # Jobs' run, seen here
        assert await jobs.cancel(threaded, reason="from the loop") is True
        assert seen.is_set()  # its callback ran before cancel() returned
        assert await jobs.wait(threaded, timeout=TIMEOUT) is Status.CANCELLED

        started = asyncio.Event()
        async with jobs.run(looped) as cp:
            assert await asyncio.to_thread(sync.cancel, looped, reason="from a thread") is True
            assert (cp.cancelled, cp.reason) == (True, "from a thread")
            with pytest.raises(Cancelled):
                await forever(cp, started)

    arun(db, driver, body, interval=60)
    thread.join(TIMEOUT)
    for job, reason in ((threaded, "from the loop"), (looped, "from a thread")):
        row = db.row(job)
        assert row is not None
        assert (row.status, row.cancel_reason) == (Status.CANCELLED, reason)
        assert row.finished_at is not None


# -- results and completion ----------------------------------------------------------


async def complete_with_a_result(engine: Any, cp: Any, job: int) -> None:
    async with AsyncSession(engine) as session, session.begin():
        session.add(Result(analysis_id=job, value="r1"))
        await cp.acomplete(session)


def test_acomplete_commits_the_results_with_the_completion(db, driver):
    done, cancelled = db.add(), db.add()

    async def body(jobs: AsyncJobs) -> None:
        engine = jobs._engine
        async with jobs.run(done) as cp, AsyncSession(engine) as session, session.begin():
            session.add(Result(analysis_id=done, value="r1"))
            await cp.acomplete(session)
        async with jobs.run(cancelled) as cp:
            await jobs.cancel(cancelled, reason="changed my mind")
            with pytest.raises(Cancelled):
                await complete_with_a_result(engine, cp, cancelled)
            with pytest.raises(TypeError, match="acomplete"):
                cp.complete(AsyncSession(engine))

    arun(db, driver, body)
    with db.engine.connect() as conn:
        values = conn.execute(select(Result.analysis_id, Result.value)).all()
    assert [tuple(v) for v in values] == [(done, "r1")]
    assert db.row(done).status is Status.COMPLETED  # type: ignore[union-attr]
    assert db.row(cancelled).status is Status.CANCELLED  # type: ignore[union-attr]


# -- task cancellation ---------------------------------------------------------------


async def blocked_in_sleep() -> Callable[[], Awaitable[object]]:
    return lambda: asyncio.sleep(3600)


async def blocked_in_socket_read() -> Callable[[], Awaitable[object]]:
    """A read from a server on loopback that accepts and never sends."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read() -> object:
        try:
            return await reader.read(1)
        finally:
            for w in [writer, *accepted]:
                w.close()
            server.close()

    return read


async def blocked_in_websocket_receive() -> Callable[[], Awaitable[object]]:
    """A receive on a WebSocket whose server (on loopback) never sends."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def silent(ws: Any) -> None:
        await ws.wait_closed()

    server = await serve(silent, "127.0.0.1", 0)
    port = next(iter(server.sockets)).getsockname()[1]
    ws = await connect(f"ws://127.0.0.1:{port}")

    async def receive() -> object:
        try:
            return await ws.recv()
        finally:
            await ws.close()
            server.close()

    return receive


BLOCKERS = {
    "sleep": blocked_in_sleep,
    "socket": blocked_in_socket_read,
    "websocket": blocked_in_websocket_receive,
}


@drivers("sqlite", "asyncpg")
@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_cancel_task_stops_a_body_blocked_in_await(db, driver, blocker):
    """`cancel_task=True`: a cancel stops a body that never calls cp() again; the job
    ends cancelled with its reason, and the block swallows the cancellation."""
    job = db.add()

    async def body(jobs: AsyncJobs) -> float:
        blocked = await BLOCKERS[blocker]()
        inside = asyncio.Event()
        stopped_at: list[float] = []

        async def work() -> str:
            async with jobs.run(job, cancel_task=True) as cp:
                cp()
                inside.set()
                await blocked()
                return "the body went on"
            stopped_at.append(time.perf_counter())
            return "stopped"

        task = asyncio.create_task(work())
        await inside.wait()
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        assert await jobs.cancel(job, reason="user left") is True
        assert await asyncio.wait_for(task, TIMEOUT) == "stopped"
        assert not task.cancelled()
        assert await jobs.status(job) is Status.CANCELLED
        return stopped_at[0] - t0

    took = arun(db, driver, body, interval=60)
    row = db.row(job)
    assert row is not None
    assert (row.status, row.cancel_reason) == (Status.CANCELLED, "user left")
    assert row.finished_at is not None
    assert took < 5, took


@drivers("sqlite", "asyncpg")
def test_task_cancellation_is_told_apart_from_outer_cancellations(db, driver):
    timed_out, inner_timeout, in_group, sibling, outer = (db.add() for _ in range(5))

    async def body(jobs: AsyncJobs) -> None:
        # An outer timeout is not a dbcancel cancel: TimeoutError, the job failed.
        async def outer_timeout() -> None:
            async with asyncio.timeout(None) as limit, jobs.run(timed_out, cancel_task=True):
                # Due once the job runs: a start slower than the limit would never run it.
                limit.reschedule(asyncio.get_running_loop().time() + 0.2)
                await asyncio.sleep(3600)

        with pytest.raises(TimeoutError):
            await outer_timeout()

        # A dbcancel cancel inside an asyncio.timeout is not a timeout.
        async def under_timeout() -> str:
            async with jobs.run(inner_timeout, cancel_task=True):
                async with asyncio.timeout(3600):
                    await asyncio.sleep(3600)
            return "stopped"

        task = asyncio.create_task(under_timeout())
        await asyncio.sleep(0.1)
        await jobs.cancel(inner_timeout, reason="inner")
        assert await asyncio.wait_for(task, TIMEOUT) == "stopped"

        # In a TaskGroup: the cancelled job stops, its sibling goes on and completes.
        sibling_done = asyncio.Event()

        async def cancelled_member() -> None:
            async with jobs.run(in_group, cancel_task=True):
                await asyncio.sleep(3600)

        async def sibling_member() -> None:
            async with jobs.run(sibling, cancel_task=True):
                await asyncio.sleep(0.3)
            sibling_done.set()

        async def cancel_soon() -> None:
            await asyncio.sleep(0.1)
            await jobs.cancel(in_group, reason="group")

        async with asyncio.TaskGroup() as group:
            group.create_task(cancelled_member())
            group.create_task(sibling_member())
            group.create_task(cancel_soon())
        assert sibling_done.is_set()

        # An outer cancel of the task as well as dbcancel's: the task stays cancelled.
        async def both() -> None:
            async with jobs.run(outer, cancel_task=True):
                await asyncio.sleep(3600)

        task = asyncio.create_task(both())
        await asyncio.sleep(0.1)
        await jobs.cancel(outer, reason="both")  # the task's cancel is requested...
        task.cancel()  # ...and so is an outer one, before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(db, driver, body)
    expected = {
        timed_out: (Status.FAILED, None),
        inner_timeout: (Status.CANCELLED, "inner"),
        in_group: (Status.CANCELLED, "group"),
        sibling: (Status.COMPLETED, None),
        outer: (Status.CANCELLED, "both"),
    }
    for job, (status, reason) in expected.items():
        row = db.row(job)
        assert row is not None
        assert (row.status, row.cancel_reason) == (status, reason), job
        assert row.finished_at is not None
    assert db.row(timed_out).error == "CancelledError"  # type: ignore[union-attr]


# -- many jobs, many waiters --------------------------------------------------------------

RANDOM_CANCELS = """
import json, random, sys, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
engine = create_engine(sys.argv[1])
jobs = Jobs(engine, Analysis)
ids = json.loads(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
results = {}
for job in rng.sample(ids, len(ids) // 2):
    time.sleep(rng.uniform(0, 0.01))
    results[job] = jobs.cancel(job, reason="random")
print(json.dumps(results))
"""


@pytest.mark.slow
@drivers("sqlite", "asyncpg", "mariadb")
def test_random_cancels_across_200_jobs_from_another_process(db, driver):
    """200 jobs on one loop, half of them cancelled at random moments by another
    process: none completes after a cancel that returned True, none is left running."""
    import json

    ids = [db.add() for _ in range(200)]

    async def body(jobs: AsyncJobs) -> dict[str, bool]:
        async def work(job: int) -> None:
            entered = False
            try:
                async with jobs.run(job) as cp:
                    entered = True
                    for _ in range(150):
                        cp()
                        await asyncio.sleep(0.005)
            except Cancelled:
                # Cancelled before its run started (SQLite starts them one by one): the
                # statement raises, the body never runs.
                if entered:
                    raise

        tasks = [asyncio.create_task(work(j)) for j in ids]
        await asyncio.sleep(0.2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RANDOM_CANCELS,
            db.url,
            json.dumps(ids),
            "7",
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT * 4)
        return {str(k): v for k, v in json.loads(out).items()}

    results = arun(db, driver, body)
    cancelled_true = {int(k) for k, v in results.items() if v}
    assert cancelled_true, "no cancel came while the jobs ran"
    statuses = {job: db.row(job).status for job in ids}  # type: ignore[union-attr]
    assert [j for j in cancelled_true if statuses[j] is not Status.CANCELLED] == []
    assert [j for j, s in statuses.items() if s in (Status.IN_PROGRESS, Status.PENDING)] == []


@drivers(*PG_DRIVERS, "sqlite")
def test_waiters_hold_no_thread(db, driver):
    """300 concurrent `await jobs.wait()` of running jobs: no thread per waiter."""
    ids = [db.add() for _ in range(30)]

    async def body(jobs: AsyncJobs) -> int:
        release = asyncio.Event()

        async def work(job: int) -> None:
            async with jobs.run(job) as cp:
                while not release.is_set():
                    cp()
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(work(j)) for j in ids]
        await asyncio.sleep(0.2)
        before = threading.active_count()
        waiters = [asyncio.create_task(jobs.wait(j, timeout=TIMEOUT)) for j in ids * 10]
        await asyncio.sleep(0.5)
        during = threading.active_count()
        release.set()
        assert set(await asyncio.gather(*waiters)) == {Status.COMPLETED}
        await asyncio.gather(*tasks)
        return during - before

    grown = arun(db, driver, body)
    # aiosqlite runs each connection in a thread of its own: the pool's, not the waiters'.
    assert grown <= (2 if driver in PG_DRIVERS else 20), grown


# -- the synchronous Jobs, awaited ----------------------------------------------------------


@pytest.mark.serial
@drivers("sqlite", "psycopg", "mariadb")
def test_jobs_awaitables_never_block_the_loop(db, driver):
    """`Jobs.acancel`, `acancel_where`, `astatus` and `await_` from a coroutine, for
    jobs running in threads: the ticker's largest gap stays within twice its gap on the
    same loop without them, and 100 waiters hold no thread each."""
    jobs = Jobs(db.engine, Analysis, interval=0.05)
    grown: list[int] = []

    def worker(job: int, entered: threading.Barrier) -> None:
        with jobs.run(job) as cp:
            entered.wait(TIMEOUT)
            while True:
                cp()
                time.sleep(0.002)

    async def trial(number: int) -> Callable[[], Awaitable[object]]:
        ids = [db.add(user_id=f"batch{number}") for _ in range(5)]
        entered = threading.Barrier(len(ids) + 1)
        threads = [threading.Thread(target=worker, args=(j, entered), daemon=True) for j in ids]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(entered.wait, TIMEOUT)

        async def measured() -> None:
            assert await jobs.astatus(ids[0]) is Status.IN_PROGRESS
            before = threading.active_count()
            waiters = [asyncio.create_task(jobs.await_(j, timeout=TIMEOUT)) for j in ids * 20]
            await asyncio.sleep(0.3)
            grown.append(threading.active_count() - before)
            assert await jobs.acancel(ids[0], reason="awaited") is True
            assert await jobs.acancel_where(user_id=f"batch{number}") == len(ids) - 1
            assert set(await asyncio.gather(*waiters)) == {Status.CANCELLED}
            for thread in threads:
                await asyncio.to_thread(thread.join, TIMEOUT)

        return measured

    async def main() -> None:
        results = await probe(trial)
        assert_not_blocked(results, "Jobs was awaited")

    asyncio.run(main())
    # The loop's executor (at most min(32, cores + 4) threads) and the runtime thread.
    assert max(grown) <= min(32, (os.cpu_count() or 1) + 4) + 1, grown
