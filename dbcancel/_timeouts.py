"""Client-side time limits for the runtime's own round trips (polls and heartbeats).

A server-side timeout (`statement_timeout`) never fires for a query that never reaches
the server: behind a proxy or a network path that stops forwarding, a poll would wait
on its socket for as long as the kernel keeps the connection, and every job it serves
would run on unwatched. The shipped backends run their polls and beats inside
`limit(seconds)`, and apply the limit to the driver's connection with
`applied(dbapi_connection)`:

* psycopg 3 (3.2 and newer): the connection's wait for the server gets a deadline;
  when it passes, the connection is closed (it is mid-query, unusable) and the query
  raises `psycopg.OperationalError`.
* PyMySQL (and Django's MySQL backend on it): the socket gets a timeout; PyMySQL closes
  the connection and raises `OperationalError` 2013, "Lost connection".
* Anything else (SQLite is in-process; other drivers): no limit. The checkpoints of
  jobs with `max_staleness` still judge staleness by themselves.

A connection closed this way is replaced by the pool like any broken connection.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["POLL_TIMEOUT", "applied", "limit"]

POLL_TIMEOUT = 10.0
"""Seconds one poll or heartbeat round trip may take before it is abandoned."""

_state = threading.local()


@contextlib.contextmanager
def limit(seconds: float | None) -> Iterator[None]:
    """Limit the round trips that this thread's backend calls make in the block."""
    previous = getattr(_state, "seconds", None)
    _state.seconds = seconds
    try:
        yield
    finally:
        _state.seconds = previous


def current() -> float | None:
    """The limit of the enclosing `limit()` block in this thread, or None."""
    seconds: float | None = getattr(_state, "seconds", None)
    return seconds


@contextlib.contextmanager
def applied(dbapi_connection: Any) -> Iterator[None]:
    """Apply the current limit (if any) to `dbapi_connection` for the block."""
    seconds = current()
    if seconds is None or dbapi_connection is None:
        yield
        return
    if _is_psycopg(dbapi_connection):
        with _psycopg_deadline(dbapi_connection, seconds):
            yield
    elif _is_pymysql(dbapi_connection):
        with _socket_timeout(dbapi_connection, seconds):
            yield
    else:
        yield


def _is_psycopg(conn: Any) -> bool:
    wait = getattr(type(conn), "wait", None)
    return hasattr(conn, "pgconn") and wait is not None and "timeout" in _parameters(wait)


_signatures: dict[Any, frozenset[str]] = {}


def _parameters(fn: Any) -> frozenset[str]:
    names = _signatures.get(fn)
    if names is None:
        try:
            names = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = frozenset()
        _signatures[fn] = names
    return names


@contextlib.contextmanager
def _psycopg_deadline(conn: Any, seconds: float) -> Iterator[None]:
    # psycopg runs every statement through conn.wait(gen, interval, timeout); an
    # instance attribute shadows the method for the length of the block.
    original = type(conn).wait
    deadline = time.monotonic() + seconds

    def wait(gen: Any, interval: Any = None, timeout: float | None = None) -> Any:
        remaining = max(0.0, deadline - time.monotonic())
        bound = remaining if timeout is None else min(timeout, remaining)
        args = (gen,) if interval is None else (gen, interval)
        try:
            return original(conn, *args, timeout=bound)
        except Exception as err:
            if type(err).__name__ != "_WaitTimeout":
                raise
            # Mid-query: the connection cannot be used again. Closing it makes the
            # pool replace it.
            with contextlib.suppress(Exception):
                conn.close()
            import psycopg

            raise psycopg.OperationalError(
                f"dbcancel: no answer from the server within {seconds:g}s; "
                "the connection was closed"
            ) from None

    conn.wait = wait
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del conn.wait


def _is_pymysql(conn: Any) -> bool:
    return type(conn).__module__.startswith("pymysql") and hasattr(conn, "_sock")


@contextlib.contextmanager
def _socket_timeout(conn: Any, seconds: float) -> Iterator[None]:
    sock = conn._sock
    if sock is None:
        yield
        return
    sock.settimeout(seconds)
    try:
        yield
    finally:
        # PyMySQL closes the socket itself after a timeout (conn._sock is then None).
        if conn._sock is sock:
            with contextlib.suppress(OSError):
                sock.settimeout(getattr(conn, "_read_timeout", None))
