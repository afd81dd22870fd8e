"""Cancellation for asyncio code without blocking the event loop on the database.

Async code cannot call a threadless checkpoint that polls by itself: a due poll would run
a database round trip on the event loop. Instead, `watching` hands the checkpoint to
the runtime thread for the length of the block: the same poller, and the same poll step,
as the watched mode's, and the checkpoint's own calls stop polling meanwhile. A cancel
observed there (or issued in this process, which flips the checkpoint at once) runs the
checkpoint's `on_cancel` callbacks in that thread; async code turns those into
loop-safe actions with `loop.call_soon_threadsafe`. The loop itself runs no poller task.

The awaitable `wait()` of both sides lives here too (`wait_stopped`): the same steps
as the synchronous `wait()`, but every pause is an `await` on the loop, and a job
running in this process is awaited through its checkpoint's end callbacks, never
through a thread blocked on its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .backend import JobRow
from .checkpoint import Checkpoint
from .models import JobId, Status
from .registry import registry

__all__ = [
    "MAX_WAIT_POLL",
    "WAIT_READS",
    "LoopEvent",
    "check_timeout",
    "ended",
    "wait_reads",
    "wait_stopped",
    "watching",
]

MAX_WAIT_POLL = 1.0
"""The longest pause between two reads of a job's row while waiting: `wait()` reads
at most `min(interval, MAX_WAIT_POLL)` apart (the awaitable waits, the rows of all
their jobs in one statement)."""


@asynccontextmanager
async def watching(cp: Checkpoint) -> AsyncIterator[None]:
    """Keep `cp` polled, off the event loop, for the duration of the block.

    A watched checkpoint needs nothing more: its run registered it with the runtime. A
    threadless one (`watch=False`) is polled by the runtime thread while inside; blocks
    may nest.
    """
    if cp.watched or cp.cancelled:
        yield
        return
    cp._serve()
    try:
        yield
    finally:
        cp._unserve()


WAIT_READS = 2
"""How many reads of waited rows one event loop runs at once (the rest queue): a
thousand `wait()` calls started together must neither take every connection of the
application's pool nor, through as many threads, the GIL away from the loop."""

_wait_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def wait_reads() -> asyncio.Semaphore:
    """The running loop's bound on the reads of waited rows (see `WAIT_READS`)."""
    loop = asyncio.get_running_loop()
    limit = _wait_reads.get(loop)
    if limit is None:
        limit = _wait_reads[loop] = asyncio.Semaphore(WAIT_READS)
    return limit


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Schedule `fn` on `loop` from any thread; nothing once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class LoopEvent:
    """An `asyncio.Event` of one loop whose `set()` any thread may call (the runtime
    thread's notifications set it), so that a coroutine waits on it without a thread."""

    __slots__ = ("_loop", "event")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.event = asyncio.Event()

    def set(self) -> None:
        """Set the event, from any thread."""
        _call_soon(self._loop, self.event.set)

    def clear(self) -> None:
        """Clear the event (on its loop)."""
        self.event.clear()

    async def wait(self, timeout: float | None) -> None:
        """Wait until the event is set, at most `timeout` seconds (None: no limit)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.event.wait()


async def ended(cps: Sequence[Checkpoint], timeout: float | None) -> bool:
    """Wait until the runs of `cps` (jobs running in this process, in any thread or
    loop) have recorded how they ended, at most `timeout` seconds; True when they have.
    Holds no thread: each run's end calls back onto this loop."""
    pending = [cp for cp in cps if cp._leaving()]
    if not pending:
        return True
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    left = [len(pending)]

    def one() -> None:
        left[0] -= 1
        if left[0] <= 0:
            done.set()

    for cp in pending:
        cp._when_ended(lambda: _call_soon(loop, one))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await done.wait()
    return not any(cp._leaving() for cp in pending)


def check_timeout(timeout: Any) -> None:
    """Refuse a `wait()` timeout that is not None or a number of seconds >= 0."""
    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


async def wait_stopped(
    read: Callable[[], Awaitable[JobRow]],
    *,
    key: Hashable,
    job_id: JobId,
    model_name: str,
    timeout: float | None,
    interval: float,
    woken: LoopEvent,
) -> Status:
    """`wait()` as a coroutine: until the job's row has `finished_at` and its run in
    this process (if any) has left; its final status.

    `read()` reads the row (raising `JobNotFound`): once, then again each time `woken`
    is set, which the loop's runtime does when a poll of the waited rows (one
    statement per table) finds this one stopped, and on PostgreSQL when a
    notification names the job. A job running in this process is awaited through its
    run's end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        woken.clear()
        async with wait_reads():
            row = await read()
        remaining = math.inf if deadline is None else deadline - time.monotonic()
        if row.finished_at is not None:
            # The run of the job in this process may still be leaving run(): return
            # once it has left, so that what the caller does next (delete the job's
            # files) never overlaps any part of the worker.
            bound = None if deadline is None else max(remaining, 0.0)
            if await ended(registry.checkpoints(key, job_id), bound):
                return row.status
            remaining = math.inf if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"{model_name} {job_id!r} has not stopped after {timeout}s "
                f"(status {row.status.value!r})"
            )
        local = registry.checkpoints(key, job_id)
        if local:
            await ended(local[:1], min(remaining, interval))
        else:
            await woken.wait(None if math.isinf(remaining) else remaining)
