"""Job states, the transition table and the SQLAlchemy mixin that stores them.

The row is the single source of truth: a job's ``status`` column says whether it may run,
and every change of it is one conditional ``UPDATE`` built from :data:`TRANSITIONS` (see
:mod:`dbcancel._sqla`). Nothing here talks to a database.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    event,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, declared_attr, mapped_column
from sqlalchemy.sql.naming import conv

__all__ = [
    "REQUIRED_COLUMNS",
    "TERMINAL",
    "TRANSITIONS",
    "WORKER_ID_LENGTH",
    "WORKER_TABLE",
    "CancellableMixin",
    "Status",
    "StatusType",
    "UTCDateTime",
    "allowed_sources",
    "status_check_name",
    "status_check_sql",
    "worker_table",
]


class Status(enum.StrEnum):
    """The five states of a job. Values are the strings stored in the ``status`` column."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def terminal(cls) -> frozenset[Status]:
        """The states nothing leaves: completed, failed and cancelled."""
        return TERMINAL

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in TERMINAL


TERMINAL: frozenset[Status] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
"""The states nothing leaves."""

TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.IN_PROGRESS, Status.CANCELLED}),
    Status.IN_PROGRESS: frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}
"""Every allowed status change, as ``{from: {to, ...}}``. The only place they are listed."""


def allowed_sources(to: Status) -> frozenset[Status]:
    """The states from which a job may move to ``to`` (the ``status IN (...)`` of its UPDATE)."""
    return frozenset(src for src, targets in TRANSITIONS.items() if to in targets)


REQUIRED_COLUMNS: tuple[str, ...] = (
    "status",
    "cancel_requested_at",
    "cancel_reason",
    "cancel_observed_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "error",
    "worker_id",
)
"""The columns :class:`CancellableMixin` adds and :class:`dbcancel.Jobs` needs."""

CANCEL_REASON_LENGTH = 255
ERROR_LENGTH = 2000
WORKER_ID_LENGTH = 255
"""The length of a worker id (``host:pid:token``)."""

WORKER_TABLE = "dbcancel_worker"
"""The table of worker processes: one row per process running jobs, beating while it
does. It lives beside the job tables (same schema) and serves all of them."""
# The mixin's columns come after the model's own (id first) in CREATE TABLE.
_LAST = 1000


def status_check_sql(column: str = "status") -> str:
    """The SQL of the CHECK constraint that limits ``column`` to the five status values."""
    values = ", ".join(f"'{s.value}'" for s in Status)
    return f"{column} IN ({values})"


class StatusType(TypeDecorator[Status]):
    """A ``VARCHAR(16)`` that reads back as :class:`Status` and refuses unknown values."""

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

    PostgreSQL stores ``timestamptz``; SQLite and MySQL/MariaDB, which keep no zone, store
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
    """The :data:`WORKER_TABLE` in ``metadata`` (in ``schema``), added if it is missing.

    ``id`` names the process (``host:pid:token``, the value a job's ``worker_id``
    holds), ``started_at`` when it first ran a job, ``heartbeat_at`` when it last
    showed it was alive, on the database's clock. The mixin adds it to the metadata of
    every model that uses it, so ``metadata.create_all()`` and Alembic's autogenerate
    see it.
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
        # Named, so that every metadata and every migration makes the same table.
        PrimaryKeyConstraint("id", name=conv(f"pk_{WORKER_TABLE}")),
        schema=schema,
    )


def status_check_name(table: str) -> str:
    """The name of the status CHECK constraint of ``table``: ``ck_<table>_status``."""
    return f"ck_{table}_status"


def _add_status_check(column: Column[Any], table: Table) -> None:
    table.append_constraint(
        CheckConstraint(status_check_sql(column.name), name=conv(status_check_name(table.name)))
    )
    worker_table(table.metadata, table.schema)


class CancellableMixin:
    """Adds the columns of a cancellable job to a declarative model.

    ::

        class Analysis(CancellableMixin, Base):
            __tablename__ = "analysis"
            id: Mapped[int] = mapped_column(primary_key=True)

    Columns: ``status`` (not null, default ``pending``, indexed, with a CHECK constraint
    named ``ck_<table>_status``), ``cancel_requested_at``, ``cancel_reason``,
    ``cancel_observed_at``, ``started_at``, ``finished_at``, ``heartbeat_at`` (aware UTC
    datetimes, null), ``error`` (the text of the exception that failed the job) and
    ``worker_id`` (the process running it). "Stopped" means ``finished_at IS NOT
    NULL``. Change ``status`` only through :class:`dbcancel.Jobs`. The model's metadata
    also gets the :data:`WORKER_TABLE`, where each worker process beats.
    """

    @declared_attr
    def status(cls) -> Mapped[Status]:
        """The job's state; see :class:`Status` and :data:`TRANSITIONS`."""
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
    """When a worker moved the job to ``in_progress``."""
    finished_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """When the job really stopped; null while a worker may still be running it."""
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), default=None, sort_order=_LAST
    )
    """Kept for rows started by dbcancel 0.1, whose workers beat each job's row;
    ``jobs.reap()`` reads it for rows without a ``worker_id``. Workers now beat their
    row in the worker table instead."""
    error: Mapped[str | None] = mapped_column(Text(), default=None, sort_order=_LAST)
    """The text of the exception that failed the job."""
    worker_id: Mapped[str | None] = mapped_column(
        String(WORKER_ID_LENGTH), default=None, sort_order=_LAST
    )
    """The process running (or that ran) the job, ``host:pid:token``: its row in the
    worker table (:data:`WORKER_TABLE`) says whether it is still alive."""
