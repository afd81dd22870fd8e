"""PostgreSQL push: a dedicated psycopg 3 connection that LISTENs for a table's cancels.

A cancel on PostgreSQL (through [`dbcancel.Jobs`][dbcancel.Jobs] or `DjangoJobs`) runs
`pg_notify` on the table's channel (`channel_name`, named after its schema and
table) in the transaction of the status change, so a notification arrives only once the
cancel has committed, and a cancel through either ORM wakes the watchers of both. The
watcher waits on this connection between its polls and polls at once when a notification
names one of its jobs. Polling stays the safety net: a notification lost while this
connection was down costs at most one interval.

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

__all__ = ["IDENTITY_SQL", "PgListener", "channel_name", "connect_from_engine"]


SCHEMA_OF = (
    "coalesce((SELECT relnamespace::regnamespace::text FROM pg_catalog.pg_class "
    "WHERE oid = to_regclass(%s)), quote_ident(current_schema()))"
)
"""The schema a table reference (`%s`, quoted SQL) resolves to on the connection's
`search_path`, as `regnamespace` prints it (quoted where SQL needs it); the current
schema while no such table exists. The SQLAlchemy backend builds the same expression."""

IDENTITY_SQL = f"SELECT current_database(), {SCHEMA_OF}, {SCHEMA_OF}"
"""The database, the schema of the job table and that of the worker table (the two
parameters are their references), asked in one round trip when a backend first needs
to know which tables it works on."""


def channel_name(schema: str, table: str) -> str:
    """The notification channel of the cancels of `schema.table` (at most 63 bytes).

    Channels are per database, not per schema: the schema is part of the name so that
    a cancel of job 7 in one schema never reaches a watcher of job 7 in another.
    `schema` is the table's schema as the backends resolve it (see
    `SCHEMA_OF`), so that the SQLAlchemy and the Django side, and the sender
    and the listener, agree on it.
    """
    qualified = f"{schema}.{table}"
    name = f"dbcancel:{qualified}"
    if len(name.encode()) <= 63:
        return name
    return "dbcancel:" + hashlib.sha256(qualified.encode()).hexdigest()[:40]


def connect_from_engine(engine: Engine) -> Callable[[], Any]:
    """The connect step of a listener over a connection taken out of `engine`'s pool
    for good: it has the engine's connect arguments and events, and is detached."""

    def connect() -> Any:
        raw = engine.raw_connection()
        conn = raw.driver_connection  # read first: detach() forgets it
        assert conn is not None
        raw.detach()
        return conn

    return connect


class _Channel:
    """A table's channel: how to name it (the backend's resolution), and the name once
    a LISTEN resolved it (shared by every listener that took the channel over)."""

    __slots__ = ("name", "resolve")

    def __init__(self, resolve: Callable[[], str]) -> None:
        self.resolve = resolve
        self.name: str | None = None


class PgListener:
    """LISTEN on a table's channel over a psycopg 3 connection that `connect` opens.

    `channel` returns the channel's name: the backend's, resolved once with the rest
    of its identity (never on this connection, which knows nothing of a SQLAlchemy
    engine's `schema_translate_map`). The connection is switched to autocommit, and
    shows in `pg_stat_activity` under the `application_name` it was opened with
    followed by `dbcancel-listener`. One connection can listen for several tables of
    its database: `add_channel` takes over another listener's channel (the runtime
    keeps one listener per database).
    """

    def __init__(self, connect: Callable[[], Any], channel: Callable[[], str]) -> None:
        self._connect = connect
        self._channel = _Channel(channel)
        self._channels: list[_Channel] = [self._channel]
        self._listening: set[int] = set()  # ids of the channels LISTENed on this connection
        self._conn: Any = None

    def connect(self) -> None:
        """Open the connection and LISTEN; raises when the database cannot be reached."""
        self.close()
        for channel in self._channels:  # before connecting: it may ask the database, and fail
            channel.name = channel.resolve()
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
            self._conn = conn
            self.listen_pending()
        except BaseException:
            self._conn = None
            self._listening.clear()
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def add_channel(self, other: PgListener) -> None:
        """Listen for `other`'s table too (from the next `listen_pending` or connect)."""
        if all(c is not other._channel for c in self._channels):
            self._channels.append(other._channel)

    @property
    def pending(self) -> bool:
        """True when a channel was added since the connection last LISTENed."""
        return self._conn is not None and len(self._listening) < len(self._channels)

    def listen_pending(self) -> None:
        """LISTEN on the channels added since the connection opened."""
        from psycopg import sql

        conn = self._conn
        if conn is None:
            return
        for channel in list(self._channels):
            if id(channel) in self._listening:
                continue
            channel.name = channel.resolve()
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel.name)))
            self._listening.add(id(channel))

    def channel_name(self) -> str | None:
        """This listener's own table's channel once a LISTEN resolved it (no query)."""
        return self._channel.name

    def fileno(self) -> int | None:
        """The connection's socket, for waiting on several listeners at once."""
        conn = self._conn
        return None if conn is None else int(conn.fileno())

    def wait(self, timeout: float) -> list[str] | None:
        """The payloads that arrive within `timeout` seconds (returns at the first
        batch); None when not connected. Raises when the connection breaks."""
        if self._conn is None:
            return None
        return [payload for _, payload in self.receive(timeout)]

    def receive(self, timeout: float) -> list[tuple[str, str]]:
        """Like `wait`, as `(channel, payload)` pairs; `[]` when not connected."""
        conn = self._conn
        if conn is None:
            return []
        return [(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=1)]

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._conn is not None

    def close(self) -> None:
        """Close the connection; harmless when it is not open."""
        conn, self._conn = self._conn, None
        self._listening.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.close()
