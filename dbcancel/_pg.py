"""PostgreSQL push: a dedicated psycopg 3 connection that LISTENs for a table's cancels.

A cancel on PostgreSQL (through [`dbcancel.Jobs`][dbcancel.Jobs] or `DjangoJobs`) runs
`pg_notify` on the table's channel (`channel_name`, named after its schema and
table) in the transaction of the status change, so a notification arrives only once the
cancel has committed, and a cancel through either ORM wakes the watchers of both. The
watcher waits on this connection between its polls and polls at once when a notification
names one of its jobs. Polling stays the safety net: a notification lost while this
connection was down costs at most one interval.

Behind a pooler in transaction mode (PgBouncer) a LISTEN goes to whichever server
connection the pooler picks for that one statement, and notifications never reach the
listener. `listen_url` (see `listen_dsn`) gives the listener a direct connection to
the server instead; and every listener proves it hears: right after its LISTEN the
runtime sends it a probe notification through the backend (the path a cancel takes),
and it counts as listening only once the probe arrives (`heard`).

The listener's name in `pg_stat_activity` is given at connect time, as a startup
parameter, never with a `SET` on the session: through a pooler a session setting would
stay on a server connection that other clients get next.

Nothing here imports SQLAlchemy or Django: each backend passes the step that opens its
connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "IDENTITY_SQL",
    "LISTENER_NAME",
    "PgListener",
    "channel_name",
    "connect_direct",
    "connect_from_engine",
    "listen_dsn",
    "listener_name",
]

LISTENER_NAME = "dbcancel-listener"
"""What a listener connection's `application_name` ends with."""


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


def listener_name(application_name: object = None) -> str:
    """The `application_name` of a listener connection: the application's own
    (`application_name`, else `PGAPPNAME`), followed by `dbcancel-listener`, cut to
    PostgreSQL's 63 bytes."""
    own = application_name if isinstance(application_name, str) and application_name else ""
    own = own or os.environ.get("PGAPPNAME", "")
    name = f"{own} {LISTENER_NAME}".strip()
    while len(name.encode()) > 63:
        name = name[1:]
    return name


_opening = threading.local()


def _name_listener(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """`do_connect` hook of an engine: a listener's connection (opened by
    `connect_from_engine` in this thread) gets its name as a startup parameter."""
    if not getattr(_opening, "listener", False):
        return
    if getattr(dialect, "driver", "") == "asyncpg":  # server settings, not libpq's keywords
        settings = dict(cparams.get("server_settings") or {})
        settings["application_name"] = listener_name(settings.get("application_name"))
        cparams["server_settings"] = settings
    else:
        cparams["application_name"] = listener_name(cparams.get("application_name"))


def connect_from_engine(engine: Engine) -> Callable[[], Any]:
    """The connect step of a listener over a new connection of `engine`: it has the
    engine's connect arguments and events (opened by a twin of its pool, never one of
    the pool's connections, which may carry session state), is named as a listener at
    connect time, and belongs to the listener alone."""
    from sqlalchemy import event

    if not event.contains(engine, "do_connect", _name_listener):
        event.listen(engine, "do_connect", _name_listener)

    def connect() -> Any:
        pool = engine.pool.recreate()
        _opening.listener = True
        try:
            raw = pool.connect()
        finally:
            _opening.listener = False
        conn = raw.driver_connection  # read first: detach() forgets it
        assert conn is not None
        raw.detach()
        pool.dispose()
        return conn

    return connect


def listen_dsn(listen_url: object) -> str:
    """The libpq connection string of a `listen_url` option: a PostgreSQL URL
    (`postgresql://`, `postgresql+psycopg://`, a SQLAlchemy `URL`) for the listener
    connection, straight to the server when the engine goes through a pooler.

    Raises `ValueError` (or `TypeError`) naming what is wrong; nothing is opened.
    """
    if hasattr(listen_url, "render_as_string") and hasattr(listen_url, "drivername"):
        url: Any = listen_url
    elif isinstance(listen_url, str):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(listen_url)
        except ArgumentError as err:
            raise ValueError(
                f"listen_url must be a PostgreSQL URL such as "
                f"'postgresql://user@db-host:5432/app', got {listen_url!r}: {err}"
            ) from None
    else:
        raise TypeError(
            f"listen_url must be a str or a sqlalchemy URL, got {type(listen_url).__name__}"
        )
    backend = str(url.drivername).split("+", 1)[0]
    if backend not in ("postgresql", "postgres"):
        raise ValueError(
            f"listen_url must be a PostgreSQL URL (postgresql://...), got one for "
            f"{backend!r}: only PostgreSQL listens for cancels"
        )
    if not url.host and not url.query.get("host"):
        raise ValueError(
            "listen_url names no host: give the server's own address, the one that "
            "bypasses the pooler (postgresql://user@db-host:5432/app)"
        )
    dsn: str = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return dsn


def connect_direct(dsn: str, params: Mapping[str, Any] | None = None) -> Callable[[], Any]:
    """The connect step of a listener over its own psycopg 3 connection to `dsn` (a
    `listen_dsn`), named as a listener at connect time; `params` are more connection
    parameters (from the application's own settings, overridden by the DSN's)."""

    def connect() -> Any:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(dsn)
        kwargs: dict[str, Any] = {**dict(params or {}), **given}
        kwargs["application_name"] = listener_name(kwargs.get("application_name"))
        return psycopg.connect(**kwargs)

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

    Each connection also LISTENs on a probe channel of its own (`probe_channel`): a
    notification on it, sent through the backend, sets `heard`, and is not passed on.
    """

    def __init__(self, connect: Callable[[], Any], channel: Callable[[], str]) -> None:
        self._connect = connect
        self._channel = _Channel(channel)
        self._channels: list[_Channel] = [self._channel]
        self._listening: set[int] = set()  # ids of the channels LISTENed on this connection
        self._conn: Any = None
        self.probe_channel: str | None = None
        self.heard = False

    def connect(self) -> None:
        """Open the connection and LISTEN; raises when the database cannot be reached."""
        self.close()
        for channel in self._channels:  # before connecting: it may ask the database, and fail
            channel.name = channel.resolve()
        conn = self._connect()
        try:
            conn.autocommit = True
            self._conn = conn
            self.listen_pending()
            from psycopg import sql

            probe = f"dbcancel:probe:{uuid.uuid4().hex}"
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(probe)))
            self.probe_channel = probe
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
        notes = [(n.channel, n.payload) for n in conn.notifies(timeout=timeout, stop_after=1)]
        if any(channel == self.probe_channel for channel, _ in notes):
            self.heard = True
            notes = [note for note in notes if note[0] != self.probe_channel]
        return notes

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._conn is not None

    def close(self) -> None:
        """Close the connection; harmless when it is not open."""
        conn, self._conn = self._conn, None
        self._listening.clear()
        self.probe_channel = None
        self.heard = False
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.close()
