"""PostgreSQL push: a dedicated psycopg 3 connection that LISTENs for a table's cancels.

``Jobs.cancel()`` on PostgreSQL runs ``pg_notify`` in the transaction of the status change,
so a notification arrives only once the cancel has committed. The watcher waits on this
connection between its polls and polls at once when a notification names one of its
jobs. Polling stays the safety net: a notification lost while this connection was down
costs at most one interval.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import Engine

__all__ = ["PgListener"]


class PgListener:
    """LISTEN on ``channel`` over a connection taken out of ``engine``'s pool for good.

    The connection comes from the engine (so it has the engine's connect arguments and
    events), is detached from the pool, switched to autocommit, and shows in
    ``pg_stat_activity`` under the engine's ``application_name`` followed by
    ``dbcancel-listener``.
    """

    def __init__(self, engine: Engine, channel: str) -> None:
        self._engine = engine
        self._channel = channel
        self._conn: Any = None

    def connect(self) -> None:
        """Open the connection and LISTEN; raises when the database cannot be reached."""
        from psycopg import sql

        self.close()
        raw = self._engine.raw_connection()
        try:
            conn = raw.driver_connection  # read first: detach() forgets it
            assert conn is not None
            raw.detach()
            conn.autocommit = True
            # Named for pg_stat_activity: the engine's own name, marked as the listener.
            conn.execute(
                "SELECT set_config('application_name', "
                "left(trim(current_setting('application_name') || ' dbcancel-listener'), 63), "
                "false)"
            )
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            raw.close()
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
