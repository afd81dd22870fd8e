"""PostgreSQL push: a dedicated psycopg 3 connection that LISTENs for a table's cancels.

A cancel on PostgreSQL (through :class:`dbcancel.Jobs` or ``DjangoJobs``) runs
``pg_notify`` on the table's :func:`channel_name` in the transaction of the status
change, so a notification arrives only once the cancel has committed, and a cancel
through either ORM wakes the watchers of both. The watcher waits on this connection
between its polls and polls at once when a notification names one of its jobs. Polling
stays the safety net: a notification lost while this connection was down costs at most
one interval.

Nothing here imports SQLAlchemy or Django: each backend passes the step that opens its
connection.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["PgListener", "channel_name", "connect_from_engine"]


def channel_name(table: str) -> str:
    """The PostgreSQL notification channel of a table's cancels (at most 63 bytes)."""
    name = f"dbcancel:{table}"
    if len(name.encode()) <= 63:
        return name
    return "dbcancel:" + hashlib.sha256(table.encode()).hexdigest()[:40]


def connect_from_engine(engine: Engine) -> Callable[[], Any]:
    """The connect step of a listener over a connection taken out of ``engine``'s pool
    for good: it has the engine's connect arguments and events, and is detached."""

    def connect() -> Any:
        raw = engine.raw_connection()
        conn = raw.driver_connection  # read first: detach() forgets it
        assert conn is not None
        raw.detach()
        return conn

    return connect


class PgListener:
    """LISTEN on ``channel`` over a psycopg 3 connection that ``connect`` opens.

    The connection is switched to autocommit, and shows in ``pg_stat_activity`` under
    the ``application_name`` it was opened with followed by ``dbcancel-listener``.
    """

    def __init__(self, connect: Callable[[], Any], channel: str) -> None:
        self._connect = connect
        self._channel = channel
        self._conn: Any = None

    def connect(self) -> None:
        """Open the connection and LISTEN; raises when the database cannot be reached."""
        from psycopg import sql

        self.close()
        conn = self._connect()
        try:
            conn.autocommit = True
            # Named for pg_stat_activity: the application's own name, marked as the
            # listener.
            conn.execute(
                "SELECT set_config('application_name', "
                "left(trim(current_setting('application_name') || ' dbcancel-listener'), 63), "
                "false)"
            )
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self._conn = conn

    def wait(self, timeout: float) -> list[str] | None:
        """The payloads that arrive within ``timeout`` seconds (returns at the first
        batch); None when not connected. Raises when the connection breaks."""
        conn = self._conn
        if conn is None:
            return None
        return [n.payload for n in conn.notifies(timeout=timeout, stop_after=1)]

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._conn is not None

    def close(self) -> None:
        """Close the connection; harmless when it is not open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.close()
