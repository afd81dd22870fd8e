"""The SQLAlchemy side of `dbcancel.models`: the mixin and its column types.

Imported only when one of these names is asked for (`from dbcancel import
CancellableMixin`, `Jobs(engine, Model)`), so the core imports no SQLAlchemy.
`dbcancel.models` re-exports every public name here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

try:
    from sqlalchemy import (
        CheckConstraint,
        Column,
        DateTime,
        Dialect,
        Integer,
        MetaData,
        PrimaryKeyConstraint,
        String,
        Table,
        Text,
        TypeDecorator,
        event,
    )
    from sqlalchemy.dialects import mysql, sqlite
    from sqlalchemy.orm import Mapped, declared_attr, mapped_column
    from sqlalchemy.sql.naming import conv
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel's CancellableMixin and Jobs(engine, Model) need SQLAlchemy, which is not "
        "installed: pip install 'dbcancel[sqlalchemy]' (Django projects use "
        "dbcancel.contrib.django instead)"
    ) from err

from .models import (
    CANCEL_REASON_LENGTH,
    WORKER_ID_LENGTH,
    WORKER_TABLE,
    Status,
    status_check_name,
    status_check_sql,
)

__all__ = ["CancellableMixin", "StatusType", "UTCDateTime", "worker_table"]

# The mixin's columns come after the model's own (id first) in CREATE TABLE.
_LAST = 1000


class StatusType(TypeDecorator[Status]):
    """A `VARCHAR(16)` that reads back as [`Status`][dbcancel.Status] and refuses unknown values."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        try:
            return Status(value).value
        except ValueError:
            raise ValueError(
                f"{value!r} is not a job status; use one of {[s.value for s in Status]}"
            ) from None

    def process_result_value(self, value: Any, dialect: Dialect) -> Status | None:
        return None if value is None else Status(value)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp with microseconds on every supported database.

    PostgreSQL stores `timestamptz`; SQLite and MySQL/MariaDB, which keep no zone, store
    UTC and read back as aware UTC datetimes. Naive datetimes are refused rather than
    guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        utc: dt.datetime = value.astimezone(dt.UTC)
        return utc if dialect.name == "postgresql" else utc.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        assert isinstance(value, dt.datetime)
        return value


def worker_table(metadata: MetaData, schema: str | None = None) -> Table:
    """The `WORKER_TABLE` in `metadata` (in `schema`), added if it is missing.

    `id` names the process (`host:pid:token`, the value a job's `worker_id`
    holds), `started_at` when it first ran a job, `heartbeat_at` when it last
    showed it was alive and `expires_at` until when that beat keeps it alive
    (`heartbeat_at` plus [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS] of its
    heartbeat periods; null in rows written by a dbcancel that predates the column), all
    on the database's clock. The mixin adds it to the metadata of every model that uses it, so
    `metadata.create_all()` and Alembic's autogenerate see it; a table made before
    `expires_at` gets it from `op.upgrade_cancellation()`.
    """
    key = WORKER_TABLE if schema is None else f"{schema}.{WORKER_TABLE}"
    existing = metadata.tables.get(key)
    if existing is not None:
        return existing
    return Table(
        WORKER_TABLE,
        metadata,
        Column("id", String(WORKER_ID_LENGTH)),
        Column("started_at", UTCDateTime(), nullable=False),
        Column("heartbeat_at", UTCDateTime(), nullable=False),
        Column("expires_at", UTCDateTime(), nullable=True),
        # Named, so that every metadata and every migration makes the same table.
        PrimaryKeyConstraint("id", name=conv(f"pk_{WORKER_TABLE}")),
        schema=schema,
    )


def _add_status_check(column: Column[Any], table: Table) -> None:
    table.append_constraint(
        CheckConstraint(status_check_sql(column.name), name=conv(status_check_name(table.name)))
    )
    worker_table(table.metadata, table.schema)
    _never_reuse_ids(table)


_SQLITE = sqlite.dialect()


def _never_reuse_ids(table: Table) -> None:
    """Make SQLite never hand out a deleted job's id again (`AUTOINCREMENT`).

    Without it SQLite gives a new row the largest rowid plus one, so deleting the newest
    job frees its id for the next one, and a late cancel or status request for the
    deleted job reaches the new job. Only where SQLite allows it: a single primary key
    column that SQLite makes an `INTEGER PRIMARY KEY` (a `BigInteger` renders `BIGINT`
    there, which `AUTOINCREMENT` refuses: `BigInteger().with_variant(Integer(),
    "sqlite")` is the usual way to have both). A `sqlite_autoincrement` in the model's
    own `__table_args__` wins.
    """
    pk = list(table.primary_key.columns)
    if len(pk) != 1 or pk[0].foreign_keys:
        return
    if _SQLITE.type_compiler_instance.process(pk[0].type.dialect_impl(_SQLITE)) != "INTEGER":
        return
    # The options given to the Table (the model's __table_args__, applied before the
    # columns attach) are the non-default ones.
    given = getattr(table.dialect_options["sqlite"], "_non_defaults", {})
    if "autoincrement" not in given:
        table.dialect_kwargs["sqlite_autoincrement"] = True


class CancellableMixin:
    """Adds the columns of a cancellable job to a declarative model.

    ```python
    class Analysis(CancellableMixin, Base):
        __tablename__ = "analysis"
        id: Mapped[int] = mapped_column(primary_key=True)
    ```

    Columns: `status` (not null, default `pending`, indexed, with a CHECK constraint
    named `ck_<table>_status`), `cancel_requested_at`, `cancel_reason`,
    `cancel_observed_at`, `started_at`, `finished_at`, `heartbeat_at` (aware UTC
    datetimes, null), `error` (the text of the exception that failed the job, or that
    caused its last retry), `worker_id` (the process running it) and `attempts` (how
    many times a worker started it). "Stopped" means `finished_at IS NOT
    NULL`. Change `status` only through [`Jobs`][dbcancel.Jobs]. The model's metadata
    also gets the `WORKER_TABLE`, where each worker process beats.

    On SQLite the table is made `AUTOINCREMENT` (`sqlite_autoincrement=True`) when its
    primary key is one integer column, so that the id of a deleted job is never given to
    a new one (SQLite otherwise reuses the largest id): a late cancel or status request
    for a deleted job then finds nothing instead of the next job. A model's own
    `__table_args__` may set `sqlite_autoincrement` otherwise. Tables made before
    this must be rebuilt to get it (see the operations guide).
    """

    @declared_attr
    def status(cls) -> Mapped[Status]:
        """The job's state; see [`Status`][dbcancel.Status] and
        [`TRANSITIONS`][dbcancel.TRANSITIONS]."""
        column = mapped_column(
            StatusType(),
            nullable=False,
            default=Status.PENDING,
            server_default=Status.PENDING.value,
            index=True,
            sort_order=_LAST,
        )
        # A table-level constraint (MariaDB refuses named column-level CHECKs), named
        # after the table, which is known only once the column joins it.
        event.listen(column.column, "after_parent_attach", _add_status_check)
        return column

    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """When the first cancel was requested."""
    cancel_reason: Mapped[str | None] = mapped_column(
        String(CANCEL_REASON_LENGTH), default=None, sort_order=_LAST
    )
    """The reason given to the first cancel (at most 255 characters)."""
    cancel_observed_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """When a worker of the job first observed the cancel (stamped when it stops)."""
    started_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """When a worker moved the job to `in_progress`."""
    finished_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """When the job really stopped; null while a worker may still be running it."""
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """Kept for rows started by dbcancel 0.1, whose workers beat each job's row;
    `jobs.reap()` reads it for rows without a `worker_id`. Workers now beat their
    row in the worker table instead."""
    error: Mapped[str | None] = mapped_column(Text(), default=None, sort_order=_LAST)
    """The text of the exception that failed the job."""
    worker_id: Mapped[str | None] = mapped_column(
        String(WORKER_ID_LENGTH), default=None, sort_order=_LAST
    )
    """The process running (or that ran) the job, `host:pid:token`: its row in the
    worker table (`WORKER_TABLE`) says whether it is still alive."""
    # After status, where upgrade_cancellation() appends it to an older table: a table
    # created now and one upgraded list their columns in the same order.
    attempts: Mapped[int] = mapped_column(
        Integer(), nullable=False, default=0, server_default="0", sort_order=_LAST + 1
    )
    """How many times a worker started the job: 1 once its body ran, 2 once a retry's
    began, ... A task queue's retry moves the job back to `pending`, keeping this and the
    `error` that caused the retry. `op.upgrade_cancellation()` adds it to a table made
    before it; a table without it runs jobs as before, uncounted."""
