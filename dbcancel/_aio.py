"""Cancellation for asyncio code without blocking the event loop on the database.

Async code cannot call ``cp()``: a due poll would run a database round trip on the event
loop. Instead, :func:`watching` registers a checkpoint with one poller per event loop,
which re-reads the rows of every checkpoint it watches in ONE query per interval per
``Jobs``, in a worker thread, and feeds the rows to the checkpoints. A cancel observed
there (or issued in this process, which flips the checkpoint at once) runs the
checkpoint's ``on_cancel`` callbacks; async code turns those into loop-safe actions with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .checkpoint import Checkpoint

__all__ = ["watching"]

log = logging.getLogger("dbcancel")


class _LoopPoller:
    """Polls the checkpoints watched on one event loop; its task runs only while it has some.

    The cadence is the smallest interval among the watched checkpoints, read at each
    sleep. A checkpoint added with a shorter interval gets its first poll at most one
    longer interval late; a cancel issued in this process needs no poll at all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: dict[Checkpoint, int] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, cp: Checkpoint) -> None:
        self._watched[cp] = self._watched.get(cp, 0) + 1
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="dbcancel-poller")

    def remove(self, cp: Checkpoint) -> None:
        count = self._watched.get(cp, 0) - 1
        if count > 0:
            self._watched[cp] = count
            return
        self._watched.pop(cp, None)
        if not self._watched and self._task is not None:
            # Nothing left to watch: end now rather than after a last sleep, so that no
            # task outlives the streams that needed it. A poll in flight in its thread
            # finishes there and is dropped.
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(cp.interval for cp in self._watched))
            await self._poll_once()

    async def _poll_once(self) -> None:
        groups: dict[int, tuple[Any, list[Checkpoint]]] = {}
        for cp in self._watched:
            if not cp.cancelled:
                groups.setdefault(id(cp._source), (cp._source, []))[1].append(cp)
        for source, cps in groups.values():
            ids = {cp.job_id for cp in cps}
            health = cps[0]._health  # one per table: shared by the checkpoints of a Jobs
            try:
                rows = await asyncio.to_thread(source._poll_rows, ids)
            except Exception:
                health.failed()
                for cp in cps:
                    cp._poll_failed()
                continue
            health.succeeded()
            for cp in cps:
                status, reason = rows.get(cp.job_id, (None, None))
                cp._apply_row(status, reason)


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPoller] = (
    weakref.WeakKeyDictionary()
)
_pollers_lock = threading.Lock()


def _poller() -> _LoopPoller:
    loop = asyncio.get_running_loop()
    with _pollers_lock:
        poller = _pollers.get(loop)
        if poller is None:
            poller = _pollers[loop] = _LoopPoller(loop)
        return poller


@asynccontextmanager
async def watching(cp: Checkpoint) -> AsyncIterator[None]:
    """Keep ``cp`` polled, off the event loop, for the duration of the block.

    A watched checkpoint (``Jobs(watch=True)``) needs nothing more: its watcher polls it.
    """
    if cp.watched:
        yield
        return
    poller = _poller()
    poller.add(cp)
    try:
        yield
    finally:
        poller.remove(cp)
