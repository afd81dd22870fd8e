"""Job states, the transition table and the SQLAlchemy mixin that stores them.

The row is the single source of truth: a job's `status` column says whether it may run,
and every change of it is one conditional `UPDATE` built from
[`TRANSITIONS`][dbcancel.TRANSITIONS] (see [`dbcancel.backend`][dbcancel.backend]). Nothing
here talks to a database, and nothing here imports an ORM: the SQLAlchemy names
([`CancellableMixin`][dbcancel.CancellableMixin], `StatusType`, `UTCDateTime`,
`worker_table`) are imported from their private module when first asked for, so a Django
project never imports SQLAlchemy through this module.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ._mixin import CancellableMixin, StatusType, UTCDateTime, worker_table

__all__ = [
    "ATTEMPTS_COLUMN",
    "REQUIRED_COLUMNS",
    "TERMINAL",
    "TRANSITIONS",
    "WORKER_ID_LENGTH",
    "WORKER_TABLE",
    "CancellableMixin",
    "JobId",
    "Status",
    "StatusType",
    "UTCDateTime",
    "allowed_sources",
    "status_check_name",
    "status_check_sql",
    "worker_table",
]


JobId: TypeAlias = Hashable
"""A job's id: the value of its row's primary key.

Of the key column's Python type: an `int` for an integer key, a `str`, a `uuid.UUID`.
None, a bool, or a value of another type than the column's raises `TypeError` before any
query is sent. Ids are dictionary keys (of the jobs running in a process), hence
`Hashable`.
"""


class Status(enum.StrEnum):
    """The five states of a job. Values are the strings stored in the `status` column."""

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
    # in_progress -> pending: the body asked its task queue for a retry (see retry_change).
    Status.IN_PROGRESS: frozenset(
        {Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.PENDING}
    ),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}
"""Every allowed status change, as `{from: {to, ...}}`. The only place they are listed.

`in_progress → pending` is a retry that the job's body asked its task queue for (a
Celery `Retry`, an RQ or Dramatiq retry): the next delivery runs the body again. It is
the only way back from `in_progress`, and nothing leaves a terminal state, so a retry
never resurrects a job that was cancelled or has finished."""


def allowed_sources(to: Status) -> frozenset[Status]:
    """The states from which a job may move to `to` (the `status IN (...)` of its UPDATE)."""
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
"""The columns [`CancellableMixin`][dbcancel.CancellableMixin] adds and
[`Jobs`][dbcancel.Jobs] needs."""

ATTEMPTS_COLUMN = "attempts"
"""The column that counts the starts of a job (1 after its first run began, 2 after the
start of its first retry, ...). The mixin and `CancellableModel` add it; a table without
it (one made by an earlier dbcancel, not yet migrated, or a plain `Table` of your own)
runs jobs as before, uncounted."""

CANCEL_REASON_LENGTH = 255
ERROR_LENGTH = 2000
WORKER_ID_LENGTH = 255
"""The length of a worker id (`host:pid:token`)."""

WORKER_TABLE = "dbcancel_worker"
"""The table of worker processes: one row per process running jobs, beating while it
does. It lives beside the job tables (same schema) and serves all of them."""


def status_check_sql(column: str = "status") -> str:
    """The SQL of the CHECK constraint that limits `column` to the five status values."""
    values = ", ".join(f"'{s.value}'" for s in Status)
    return f"{column} IN ({values})"


def status_check_name(table: str) -> str:
    """The name of the status CHECK constraint of `table`: `ck_<table>_status`."""
    return f"ck_{table}_status"


_SQLALCHEMY_NAMES = frozenset({"CancellableMixin", "StatusType", "UTCDateTime", "worker_table"})


def __getattr__(name: str) -> Any:
    # The SQLAlchemy mixin and column types, imported only when a caller asks for them.
    if name in _SQLALCHEMY_NAMES:
        from . import _mixin

        return getattr(_mixin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
