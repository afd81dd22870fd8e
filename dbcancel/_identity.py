"""What a shipped backend resolves once to know which tables it works on.

Every key dbcancel keeps per table or per worker table (the registry's, the watcher's,
the heartbeat's) and the PostgreSQL channel come from one `Identity`, asked of
the database the first time the backend needs it: the same name in another schema or
database is another table (another tenant's), and two ways of reaching one table are
the same table.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["ROUTING_OPTIONS", "Identity"]


ROUTING_OPTIONS = frozenset({"host", "hostaddr", "port", "dbname", "service", "unix_socket"})
"""Connection options that change the server or the database reached (libpq's,
PyMySQL's and mysqlclient's names). Other options (`-csearch_path=...`, timeouts) are
resolved by asking the server, or change nothing of which table a statement reaches."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The tables of one backend, as the database resolves them.

    `key` names the job table: `(orm, vendor, server, database, schema, table)`;
    `worker_key` the worker table: `(orm, vendor, server, database, worker schema)`.
    `schema` and `worker_schema` are where the connection finds them (PostgreSQL:
    as `regnamespace` prints the schema; MySQL and MariaDB: the database; SQLite: the
    attached name, `main`).
    """

    key: Hashable
    worker_key: Hashable
    schema: str | None
    worker_schema: str | None
    channel: str
    """The PostgreSQL notification channel, named after `schema` and the table."""
