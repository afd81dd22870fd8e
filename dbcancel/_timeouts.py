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

The limit is taken off the connection before any other thread can get it: the backends
give a connection back to the pool inside the block (so that the pool's reset is a
round trip within the limit too), and the pool's `checkin` event then calls
`undo_on_checkin`, in the returning thread, before the pool hands the connection out
again. Taking it off later, from the block's end, would change a socket or a wait that
another thread is already using (a PyMySQL read then saw a non-blocking socket).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "POLL_TIMEOUT",
    "applied",
    "connect_within",
    "current",
    "expired",
    "limit",
    "undo_on_checkin",
]

POLL_TIMEOUT = 10.0
"""Seconds one poll or heartbeat round trip may take before it is abandoned."""

_state = threading.local()


@contextlib.contextmanager
def limit(seconds: float | None) -> Iterator[None]:
    """Limit the round trips that this thread's backend calls make in the block."""
    previous = getattr(_state, "deadline", None)
    _state.deadline = None if seconds is None else time.monotonic() + seconds
    try:
        yield
    finally:
        _state.deadline = previous


def current() -> float | None:
    """Seconds left of the enclosing `limit()` block in this thread (at least a tenth
    of a second), or None outside any."""
    deadline: float | None = getattr(_state, "deadline", None)
    if deadline is None:
        return None
    return max(0.1, deadline - time.monotonic())


def expired() -> bool:
    """True when the enclosing `limit()` block's time is up: a round trip that failed
    then was cut short by the limit, and is not worth running again at once."""
    deadline: float | None = getattr(_state, "deadline", None)
    return deadline is not None and time.monotonic() >= deadline


def connect_within(dialect: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """A new DB-API connection whose opening respects the current limit (for
    SQLAlchemy's `do_connect` event); None outside a limit, or for a driver that
    offers no way (the caller then connects as usual).

    psycopg's `connect_timeout` bounds the whole opening. PyMySQL's bounds only the TCP
    connect: its handshake waits on the read timeout, which is given for the opening
    and then put back to the application's own.
    """
    seconds = current()
    if seconds is None:
        return None
    driver = getattr(dialect, "driver", "")
    if driver == "psycopg" and "connect_timeout" not in cparams:
        return dialect.connect(*cargs, **{**cparams, "connect_timeout": max(1, round(seconds))})
    if driver == "pymysql":
        read, write = cparams.get("read_timeout"), cparams.get("write_timeout")
        conn = dialect.connect(
            *cargs,
            **{
                **cparams,
                "read_timeout": seconds if read is None else min(read, seconds),
                "write_timeout": seconds if write is None else min(write, seconds),
                "connect_timeout": min(cparams.get("connect_timeout", seconds), seconds),
            },
        )
        conn._read_timeout, conn._write_timeout = read, write
        if conn._sock is not None:
            conn._sock.settimeout(read)
        return conn
    return None


_UNDO = "_dbcancel_undo_limit"
"""The attribute under which a connection carries the undoing of its limit."""


@contextlib.contextmanager
def applied(dbapi_connection: Any) -> Iterator[None]:
    """Apply the current limit (if any) to `dbapi_connection` for the block; it is
    taken off when the connection goes back to its pool (`undo_on_checkin`) or at the
    block's end, whichever comes first."""
    seconds = current()
    if seconds is None or dbapi_connection is None:
        yield
        return
    if _is_psycopg(dbapi_connection):
        undo = _psycopg_deadline(dbapi_connection, seconds)
    elif _is_pymysql(dbapi_connection):
        undo = _socket_timeout(dbapi_connection, seconds)
    else:
        yield
        return
    setattr(dbapi_connection, _UNDO, undo)
    try:
        yield
    finally:
        undo_on_checkin(dbapi_connection)


def undo_on_checkin(dbapi_connection: Any, *_: Any) -> None:
    """Take this module's limit off `dbapi_connection`, if it carries one (a pool
    `checkin` listener: it runs in the returning thread, before the pool hands the
    connection out again)."""
    undo = getattr(dbapi_connection, _UNDO, None)
    if undo is None:
        return
    with contextlib.suppress(AttributeError):
        delattr(dbapi_connection, _UNDO)
    undo()


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


def _psycopg_deadline(conn: Any, seconds: float) -> Callable[[], None]:
    """Give `conn` a deadline `seconds` from now; returns what takes it off."""
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

    def undo() -> None:
        with contextlib.suppress(AttributeError):
            del conn.wait

    return undo


def _is_pymysql(conn: Any) -> bool:
    return type(conn).__module__.startswith("pymysql") and hasattr(conn, "_sock")


def _socket_timeout(conn: Any, seconds: float) -> Callable[[], None]:
    """Give `conn`'s socket a timeout of `seconds`; returns what puts back its own."""
    sock = conn._sock
    if sock is None:
        return lambda: None
    sock.settimeout(seconds)

    def undo() -> None:
        # PyMySQL closes the socket itself after a timeout (conn._sock is then None).
        if conn._sock is sock:
            with contextlib.suppress(OSError):
                sock.settimeout(getattr(conn, "_read_timeout", None))

    return undo
