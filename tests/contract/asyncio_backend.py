"""`AsyncJobs` behind the synchronous face the contract tests speak to.

The contract is stated once, as synchronous calls. This module runs an event loop in a
thread of its own for the whole session and hands every call of `AsyncJobs` to it
(`run_coroutine_threadsafe`), so that the same tests drive the asyncio client: its
round trips, its loop runtime (polls, beats, LISTEN) and its checkpoints. `cp()` is
called from the test's thread, as a flag check needs no loop; `cp.complete(using)`
becomes `await cp.acomplete(async_session)` on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.util import greenlet_spawn

from dbcancel import AsyncJobs
from tests.models import Analysis, Result

_T = TypeVar("_T")

CALL_TIMEOUT = 60.0

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "mariadb": "mysql+aiomysql",
}
"""The async driver of each case: asyncpg and psycopg's async mode on PostgreSQL."""


class LoopThread:
    """An event loop running in a daemon thread; `call()` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)
        self.loop.close()


def async_engine(url: URL, driver: str) -> AsyncEngine:
    return create_async_engine(url.set(drivername=ASYNC_DRIVERS[driver]))


class SyncCheckpoint:
    """A real checkpoint, its `complete` awaited on the loop with an AsyncSession."""

    def __init__(self, cp: Any, loop: LoopThread) -> None:
        self._cp = cp
        self._loop = loop

    def __call__(self) -> None:
        self._cp()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cp, name)

    def complete(self, using: Any) -> None:
        self._loop.call(self._cp.acomplete(using))


class SyncRun:
    def __init__(self, run: Any, loop: LoopThread) -> None:
        self._run = run
        self._loop = loop

    def __enter__(self) -> SyncCheckpoint:
        return SyncCheckpoint(self._loop.call(self._run.__aenter__()), self._loop)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._loop.call(self._run.__aexit__(*exc)))


class SyncAsyncJobs:
    """`AsyncJobs` as the contract tests call `Jobs`."""

    def __init__(self, jobs: AsyncJobs, loop: LoopThread) -> None:
        self._jobs = jobs
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs, name)

    def run(self, job_id: Any, **kwargs: Any) -> SyncRun:
        return SyncRun(self._jobs.run(job_id, **kwargs), self._loop)

    def cancel(self, job_id: Any, **kwargs: Any) -> bool:
        return self._loop.call(self._jobs.cancel(job_id, **kwargs))

    def _retry(self, cp: SyncCheckpoint, error: str) -> bool:
        # The task-queue adapters retry through the worker core; AsyncJobs shares it.
        core = self._jobs._core

        async def retry() -> bool:
            return await greenlet_spawn(core._retry, cp._cp, error)

        return self._loop.call(retry())

    def cancel_where(self, **filters: Any) -> int:
        return self._loop.call(self._jobs.cancel_where(**filters))

    def status(self, job_id: Any) -> Any:
        return self._loop.call(self._jobs.status(job_id))

    def wait(self, job_id: Any, timeout: float | None = None) -> Any:
        return self._loop.call(self._jobs.wait(job_id, timeout))

    def reap(self, stale_after: float) -> int:
        return self._loop.call(self._jobs.reap(stale_after))

    def stats(self) -> Any:
        async def stats() -> Any:
            return self._jobs.stats()

        return self._loop.call(stats())


@contextmanager
def transaction(
    engine: AsyncEngine, loop: LoopThread
) -> Iterator[tuple[Any, Callable[[Any, str], None]]]:
    """An AsyncSession in an open transaction, and a writer of result rows into it."""
    session = AsyncSession(engine, expire_on_commit=False)

    async def begin() -> None:
        await session.begin()

    async def add(job_id: Any, value: str) -> None:
        session.add(Result(analysis_id=job_id, value=value))
        await session.flush()

    loop.call(begin())
    try:
        yield session, lambda job_id, value: loop.call(add(job_id, value))
    except BaseException:
        loop.call(session.rollback())
        raise
    else:
        loop.call(session.commit())
    finally:
        loop.call(session.close())


def make_jobs(engine: AsyncEngine, loop: LoopThread, **kwargs: Any) -> SyncAsyncJobs:
    return SyncAsyncJobs(AsyncJobs(engine, Analysis, **kwargs), loop)
