"""dbcancel.media on `AsyncJobs`: frame loops of an AsyncEngine app, on the loop's runtime.

The checkpoints of `AsyncJobs` jobs are served by tasks of the loop (no thread): a cancel
from the same loop, or from another process through NOTIFY, closes a stream with 1001
"cancelled" while the server is silent. Each test runs its own loop; the loop-blocking
probe bounds the ticker's largest gap while 20 streams run and are cancelled.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

pytest.importorskip("websockets")

from sqlalchemy import delete
from websockets.asyncio.client import connect

from dbcancel import AsyncJobs, Cancelled, Status
from dbcancel.media import MediaAnalysisService, receive
from tests.aio import TRIALS, assert_not_blocked, async_engine, probe
from tests.conftest import Database, open_database
from tests.integration.example_modules import SERVER_PATH, load_example
from tests.models import Analysis, Result

AnalysisServer = load_example(SERVER_PATH).AnalysisServer

_T = TypeVar("_T")

FRAMES = [bytes([i]) * (100 + i) for i in range(5)]
TIMEOUT = 30.0
CANCEL_SCRIPT = """
import sys
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
Jobs(create_engine(sys.argv[1]), Analysis).cancel(int(sys.argv[2]), reason="remote")
"""


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("sqlite", "sqlite"), marks=pytest.mark.sqlite, id="aiosqlite"),
        pytest.param(("postgresql", "asyncpg"), marks=pytest.mark.postgresql, id="asyncpg"),
    ],
)
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Database, str]]:
    name, driver = request.param
    with open_database(name, tmp_path_factory) as database:
        yield database, driver


@pytest.fixture
def db(case: tuple[Database, str]) -> Iterator[Database]:
    yield case[0]
    with case[0].engine.begin() as conn:
        conn.execute(delete(Result))
        conn.execute(delete(Analysis))


@pytest.fixture
def driver(case: tuple[Database, str]) -> str:
    return case[1]


def arun(db: Database, driver: str, body: Callable[[AsyncJobs], Awaitable[_T]], **kw: Any) -> _T:
    async def main() -> _T:
        engine = async_engine(db.url, driver)
        try:
            kw.setdefault("interval", 0.05)
            async with asyncio.timeout(TIMEOUT * 2):
                return await body(AsyncJobs(engine, Analysis, **kw))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_analyze_stops_with_1001_when_cancelled_on_the_same_loop(db, driver):
    job = db.add()

    async def body(jobs: AsyncJobs) -> float:
        async with AnalysisServer(silent=True) as server:
            service = MediaAnalysisService(server.uri, receive_timeout=60)
            threads = threading.active_count()

            async def worker() -> None:
                async with jobs.run(job) as cp:
                    await service.analyze(FRAMES, view="front", checkpoint=cp)

            task = asyncio.create_task(worker())
            await server.wait_frames_received(1)
            assert threading.active_count() <= threads + 1  # aiosqlite's connection, at most
            closing = asyncio.create_task(server.wait_closed_count(1, timeout=10))
            await jobs.cancel(job, reason="user asked")
            cancelled_at = time.monotonic()
            assert await closing == [1001]
            took = time.monotonic() - cancelled_at
            await task
            assert server.close_reasons == ["cancelled"]
            return took

    took = arun(db, driver, body, interval=60)
    assert took < 1.0, took
    row = db.row(job)
    assert row is not None
    assert (row.status, row.cancel_reason) == (Status.CANCELLED, "user asked")


def test_receive_stops_when_another_process_cancels(db, driver):
    """At a 60 s interval only the loop's listener can stop it in time (PostgreSQL)."""
    if driver != "asyncpg":
        pytest.skip("NOTIFY is PostgreSQL's; elsewhere a poll delivers it")
    job = db.add()

    async def body(jobs: AsyncJobs) -> float:
        async with AnalysisServer(silent=True) as server:
            raised: list[Cancelled] = []

            async def worker() -> None:
                async with jobs.run(job) as cp, connect(server.uri) as ws:
                    try:
                        async for _ in receive(ws, cp):
                            raise AssertionError("a silent server sent a message")
                    except Cancelled as exc:
                        raised.append(exc)
                        raise

            task = asyncio.create_task(worker())
            async with asyncio.timeout(TIMEOUT):
                while not (jobs.stats().listening and jobs.active()):
                    await asyncio.sleep(0.01)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CANCEL_SCRIPT, db.url, str(job)
            )
            assert await proc.wait() == 0
            done_at = time.monotonic()
            await asyncio.wait_for(task, TIMEOUT)
            assert [e.reason for e in raised] == ["remote"]
            assert await server.wait_closed_count(1) == [1001]
            return time.monotonic() - done_at

    took = arun(db, driver, body, interval=60)
    assert took < 5, took


@pytest.mark.serial
def test_twenty_streams_cancelled_never_block_the_loop(db, driver):
    batches = [[db.add() for _ in range(20)] for _ in range(TRIALS)]

    async def body(jobs: AsyncJobs) -> None:
        async with AnalysisServer(delay=0.005) as server:
            service = MediaAnalysisService(server.uri, receive_timeout=60)
            endless = [b"x" * 1000] * 100_000

            async def worker(job: int, started: asyncio.Event) -> None:
                async with jobs.run(job) as cp:
                    started.set()
                    await service.analyze(endless, view="front", checkpoint=cp)

            await jobs.status(batches[0][0])

            async def trial(number: int) -> Callable[[], Awaitable[object]]:
                events = [asyncio.Event() for _ in batches[number]]
                tasks = [
                    asyncio.create_task(worker(j, e))
                    for j, e in zip(batches[number], events, strict=True)
                ]
                for event in events:
                    await event.wait()
                await asyncio.sleep(0.2)

                async def calls() -> None:
                    for job in batches[number]:
                        assert await jobs.cancel(job, reason="probe") is True
                    for job in batches[number]:
                        assert await jobs.wait(job, timeout=TIMEOUT) is Status.CANCELLED
                    await asyncio.gather(*tasks)

                return calls

            results = await probe(trial)
            assert_not_blocked(results, "20 streams were cancelled and waited for")

    arun(db, driver, body)
