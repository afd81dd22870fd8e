"""PostgreSQL push: a dedicated psycopg 3 connection that LISTENs for a table's cancels.

A cancel on PostgreSQL (through [`Jobs`][dbcancel.Jobs] or `DjangoJobs`) runs
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

__all__ = ["Channel", "PgListener", "channel_name", "connect_from_engine"]


_SCHEMA_OF_TABLE = (
    "SELECT coalesce((SELECT relnamespace::regnamespace::text FROM pg_class "
    "WHERE oid = to_regclass(%s)), current_schema())"
)


def channel_name(schema: str, table: str) -> str:
    """The notification channel of the cancels of `schema.table` (at most 63 bytes).

    Channels are per database, not per schema: the schema is part of the name so that
    a cancel of job 7 in one schema never reaches a watcher of job 7 in another.
    """
    qualified = f"{schema}.{table}"
    name = f"dbcancel:{qualified}"
    if len(name.encode()) <= 63:
        return name
    return "dbcancel:" + hashlib.sha256(qualified.encode()).hexdigest()[:40]


class Channel:
    """The channel of one table, resolved on the database once and then remembered.

    `table` is the table's bare name, `reference` the same name quoted as SQL (and
    schema-qualified when the model names a schema). The schema is the one
    `reference` resolves to on the connection's `search_path` (the current schema
    while the table does not exist), asked of the database so that the SQLAlchemy and
    the Django side, and the sender and the listener, agree on it.
    """

    __slots__ = ("_name", "reference", "table")

    def __init__(self, table: str, reference: str) -> None:
        self.table = table
        self.reference = reference
        self._name: str | None = None

    def name(self, scalar: Callable[[str, list[str]], Any]) -> str:
        """The channel's name; `scalar(sql, params)` runs one query (`%s` style) on
        an open connection and returns the first column of its row."""
        if self._name is None:
            self._name = channel_name(str(scalar(_SCHEMA_OF_TABLE, [self.reference])), self.table)
        return self._name


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


class PgListener:
    """LISTEN on `channel` over a psycopg 3 connection that `connect` opens.

    The connection is switched to autocommit, and shows in `pg_stat_activity` under
    the `application_name` it was opened with followed by `dbcancel-listener`. One
    connection can listen for several tables of its database: `add_channel` takes
    over another listener's channel (the runtime keeps one listener per database).
    """

    def __init__(self, connect: Callable[[], Any], channel: Channel) -> None:
        self._connect = connect
        self._channel = channel
        self._channels: list[Channel] = [channel]
        self._listening: set[int] = set()  # ids of the channels LISTENed on this connection
        self._conn: Any = None

    def connect(self) -> None:
        """Open the connection and LISTEN; raises when the database cannot be reached."""
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
            name = channel.name(lambda query, params: conn.execute(query, params).fetchone()[0])
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
            self._listening.add(id(channel))

    def channel_name(self) -> str | None:
        """This listener's own table's channel, once resolved (no query)."""
        return self._channel._name

    def fileno(self) -> int | None:
        """The connection's socket, for waiting on several listeners at once."""
        conn = self._conn
        return None if conn is None else int(conn.fileno())

    def wait(self, timeout: float) -> list[str] | None:
        """The payloads that arrive within `timeout` seconds (returns at the first
        batch); None when not connected. Raises when the connection breaks."""
        notes = self.receive(timeout)
        return None if self._conn is None and not notes else [payload for _, payload in notes]

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
