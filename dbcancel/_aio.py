"""Cancellation for asyncio code without blocking the event loop on the database.

Async code cannot call a threadless checkpoint that polls by itself: a due poll would run
a database round trip on the event loop. Instead, `watching` hands the checkpoint to
the runtime thread for the length of the block: the same poller, and the same poll step,
as the watched mode's, and the checkpoint's own calls stop polling meanwhile. A cancel
observed there (or issued in this process, which flips the checkpoint at once) runs the
checkpoint's `on_cancel` callbacks in that thread; async code turns those into
loop-safe actions with `loop.call_soon_threadsafe`. The loop itself runs no poller task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .checkpoint import Checkpoint

__all__ = ["watching"]


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
