"""What happened, told to the metrics and tracing integrations that asked to hear it.

A call site does `if _events.on: _events.emit("cancel", table, count=1)`: while no
integration has subscribed, `on` is an empty tuple and the whole cost is one global
read. Nothing here sits on the checkpoint's path (`cp()` per item); events come from
job starts and ends, cancels, reaps, polls, notifications and heartbeats.

Events (the `table` argument is the job table's name, or the database's label for
`beat`), with their keyword fields:

* `cancel`: `count` rows cancelled by `cancel()` or `cancel_where()`.
* `start`: `job_id`, `checkpoint`: a run moved its job to in_progress.
* `end`: `job_id`, `checkpoint`, `status` (the status the run left, `"pending"` for a
  retry), `reason` (a cancel's), `error` (a failure's text), and for a cancelled job
  the row's `requested_at`, `observed_at`, `finished_at` (aware UTC, or None).
* `reap`: `count` jobs stopped by `reap()`.
* `poll`: `ok` (bool), `outage` (seconds of the outage this poll ended, or None).
* `notification`: one notification applied by the runtime.
* `beat`: the heartbeat of a database's worker row worked.

A subscriber that raises is logged and forgotten for that event only: metrics never
break a job.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Subscriber", "emit", "on", "subscribe", "table_of", "unsubscribe"]

log = logging.getLogger("dbcancel")

Subscriber = Callable[[str, str, dict[str, Any]], None]

on: tuple[Subscriber, ...] = ()
"""The subscribers; empty (false) while nothing listens."""

_lock = threading.Lock()


def subscribe(fn: Subscriber) -> None:
    """Call `fn(event, table, fields)` for every event from now on."""
    global on
    with _lock:
        if fn not in on:
            on = (*on, fn)


def unsubscribe(fn: Subscriber) -> None:
    """Stop calling `fn`; harmless when it was not subscribed."""
    global on
    with _lock:
        on = tuple(s for s in on if s != fn)


def emit(event: str, table: str, **fields: Any) -> None:
    """Tell every subscriber; one that raises is logged, never propagated."""
    for fn in on:
        try:
            fn(event, table, fields)
        except Exception:
            log.error("dbcancel: a metrics subscriber failed on %r", event, exc_info=True)


def table_of(backend: Any) -> str:
    """The name of a backend's job table (its model's name when it does not say)."""
    name = getattr(backend, "table_name", None)
    if isinstance(name, str):
        return name
    table = getattr(backend, "table", None)
    name = getattr(table, "name", None)
    if isinstance(name, str):
        return name
    model = getattr(backend, "model", None)
    meta = getattr(model, "_meta", None)
    name = getattr(meta, "db_table", None)
    return name if isinstance(name, str) else str(backend.model_name)


def seconds_between(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    """`end - start` in seconds, naive values taken as UTC (SQLite returns them naive);
    None when either is missing or the difference is negative."""
    if start is None or end is None:
        return None
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=dt.UTC)
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


def job_started(backend: Any, cp: Any) -> None:
    """Tell of a run that moved its job to in_progress (`cp`: its checkpoint)."""
    emit("start", table_of(backend), job_id=cp.job_id, checkpoint=cp)


def job_ended(backend: Any, cp: Any, exc: BaseException | None) -> None:
    """Tell how a started run ended, once its end is written; never raises.

    For a job that ends cancelled by a request (not decided in this process), the
    row's three cancel timestamps are read, in one more query: only while something
    subscribed.
    """
    try:
        table = table_of(backend)
        if cp._retried:
            status = "pending"
        elif cp._fenced:
            status = (cp.reason or "").split(":", 1)[0] or "cancelled"
        elif cp.cancelled:
            status = "cancelled"
        else:
            status = "completed" if exc is None else "failed"
        times: Any = None
        if status == "cancelled" and not cp._fenced and not cp._decided_here:
            read = getattr(backend, "cancel_times", None)
            if callable(read):
                from . import _timeouts

                # Bounded like a poll: a database that hangs must not hold the stop.
                with _timeouts.limit(_timeouts.POLL_TIMEOUT):
                    times = read(cp.job_id)
        requested, observed, finished = times if times else (None, None, None)
        emit(
            "end",
            table,
            job_id=cp.job_id,
            checkpoint=cp,
            status=status,
            reason=cp.reason if cp.cancelled else None,
            exception=exc if status == "failed" else None,
            requested_at=requested,
            observed_at=observed,
            finished_at=finished,
        )
    except Exception:
        log.error("dbcancel: could not report the end of a job to metrics", exc_info=True)
