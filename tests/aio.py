"""What the asyncio tests share: async engines on the test databases, and the probe
that measures how long dbcancel's calls keep the event loop from running other tasks.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "mariadb": "mysql+aiomysql",
}
"""The async drivers, by the name the tests give them."""


def async_engine(url: str, driver: str, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine on the database of `url` (a test database's synchronous URL,
    its schema in a libpq `options` on PostgreSQL) through `driver`."""
    parsed = make_url(url).set(drivername=DRIVERS[driver])
    options = parsed.query.get("options")
    if driver == "asyncpg" and isinstance(options, str):
        # asyncpg takes server settings, not libpq's options string.
        settings = dict(
            item.removeprefix("-c").split("=", 1) for item in options.split() if "=" in item
        )
        parsed = parsed.difference_update_query(["options"])
        kwargs.setdefault("connect_args", {})["server_settings"] = settings
    if driver == "sqlite":
        kwargs.setdefault("connect_args", {})["timeout"] = 30
    else:
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 20)
    return create_async_engine(parsed, **kwargs)


@dataclass
class Gaps:
    """The gaps between a ticker's ticks, in seconds."""

    gaps: list[float]

    @property
    def largest(self) -> float:
        return max(self.gaps, default=0.0)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.gaps)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def ticking(work: Callable[[], Awaitable[object]], period: float = 0.01) -> Gaps:
    """Run `work()` while a ticker task sleeps `period` seconds at a time; the gaps
    between its ticks (the loop's blocking shows as gaps longer than `period`)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(period)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(period * 3)
    try:
        await work()
    finally:
        stop.set()
        await ticker
    return Gaps(gaps[2:])


TRIALS = 3
"""Trials of a probe: a call that blocks the loop shows in every one; a gap that the
shared machine's scheduler adds at random to one window does not fail the bound."""


async def probe(
    prepare: Callable[[int], Awaitable[Callable[[], Awaitable[object]]]],
    trials: int = TRIALS,
) -> list[tuple[Gaps, Gaps]]:
    """Up to `trials` times, until one meets the bound: `prepare(trial)` (not measured:
    starting the jobs, say) returns the calls to measure; the ticker's gaps while they
    run, then for as long on the same loop without them. Returns every trial's
    (control, loaded)."""
    results: list[tuple[Gaps, Gaps]] = []
    for trial in range(trials):
        calls = await prepare(trial)
        # What the test process accumulated before (other tests' objects) is moved out
        # of the collector's reach: a full collection of it would otherwise fall into
        # whichever window allocates more, and measure the process, not dbcancel.
        gc.collect()
        gc.freeze()
        try:
            started = time.perf_counter()
            loaded = await ticking(calls)
            took = time.perf_counter() - started

            async def idle() -> None:
                await asyncio.sleep(max(took, 0.3))  # noqa: B023 - awaited at once

            control = await ticking(idle)
        finally:
            gc.unfreeze()
        results.append((control, loaded))
        if within(control, loaded):
            break
    return results


def within(control: Gaps, loaded: Gaps) -> bool:
    return bool(loaded.gaps) and loaded.largest <= 2 * control.largest


def assert_not_blocked(results: list[tuple[Gaps, Gaps]], what: str) -> None:
    """The loop-blocking bound of every async test module: the ticker's largest gap
    while dbcancel's calls run is at most twice its largest gap without them (in one
    of the trials)."""
    shown = "; ".join(
        f"{loaded.largest * 1000:.1f} ms vs {control.largest * 1000:.1f} ms idle"
        for control, loaded in results
    )
    assert within(*results[-1]), (
        f"while {what}, the ticker's largest gap was more than twice its gap on the same "
        f"loop without dbcancel's calls, in every trial: {shown}"
    )
