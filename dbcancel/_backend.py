"""The narrow seam between dbcancel's logic and an ORM.

Checkpoints, the registry and :class:`dbcancel.Jobs` speak only to a :class:`Backend`:
read one or many jobs, apply one :class:`Change` as a single conditional UPDATE, stamp a
job as stopped. The SQLAlchemy implementation lives in :mod:`dbcancel._sqla`; another ORM
implements the same few methods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .models import CANCEL_REASON_LENGTH, ERROR_LENGTH, Status, allowed_sources

__all__ = [
    "WORKER_LOST",
    "Backend",
    "Change",
    "JobRow",
    "Listener",
    "cancel_change",
    "check_id_type",
    "complete_change",
    "cut_reason",
    "fail_change",
    "start_change",
    "utcnow",
]


WORKER_LOST = "worker lost"
"""The error text of a job that ``jobs.reap()`` marked failed: its heartbeat stopped."""


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime (what every timestamp column stores)."""
    return dt.datetime.now(dt.UTC)


class JobRow(NamedTuple):
    """The columns of one job that the logic needs."""

    status: Status
    cancel_reason: str | None
    finished_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Change:
    """One status transition, described as data.

    A backend turns it into ``UPDATE t SET status = :to, <stamp> = now, <values>
    WHERE status IN (:sources) AND <filters>`` and returns the row count.
    ``stamp_if_from`` columns are set to now only when the old status is in the given set
    (a ``CASE`` evaluated against the old row).
    """

    to: Status
    stamp: tuple[str, ...] = ()
    stamp_if_from: Mapping[str, frozenset[Status]] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> frozenset[Status]:
        """The statuses this change may leave, from the transition table."""
        return allowed_sources(self.to)


def cut_reason(reason: str | None) -> str | None:
    """The reason as the row stores it (at most 255 characters).

    Local observers get the same text, so a cancel reads the same in every process.
    """
    return None if reason is None else reason[:CANCEL_REASON_LENGTH]


def check_id_type(model_name: str, id_type: type | None, job_id: Any) -> None:
    """Raise :class:`TypeError` when ``job_id`` cannot be an id of type ``id_type``.

    Shared by the backends' ``check_id``; ``id_type`` None accepts any non-None value
    except a bool.
    """
    if (
        job_id is None
        or isinstance(job_id, bool)
        or (id_type is not None and not isinstance(job_id, id_type))
    ):
        kind = id_type.__name__ if id_type is not None else "a primary key value"
        raise TypeError(
            f"{model_name} ids are {kind}, got {job_id!r} "
            f"({type(job_id).__name__}); nothing was changed"
        )


def start_change() -> Change:
    """pending → in_progress, stamping ``started_at`` and ``heartbeat_at``."""
    return Change(Status.IN_PROGRESS, stamp=("started_at", "heartbeat_at"))


def complete_change() -> Change:
    """in_progress → completed, stamping ``finished_at``."""
    return Change(Status.COMPLETED, stamp=("finished_at",))


def fail_change(error: str) -> Change:
    """in_progress → failed, keeping the error's text and stamping ``finished_at``."""
    return Change(Status.FAILED, stamp=("finished_at",), values={"error": error[:ERROR_LENGTH]})


def cancel_change(reason: str | None) -> Change:
    """pending/in_progress → cancelled.

    ``finished_at`` is stamped only for a pending job: a job in progress has stopped only
    when its worker leaves ``run()``.
    """
    return Change(
        Status.CANCELLED,
        stamp=("cancel_requested_at",),
        stamp_if_from={"finished_at": frozenset({Status.PENDING})},
        values={"cancel_reason": cut_reason(reason)},
    )


class Listener(Protocol):
    """A dedicated connection that receives the cancel notifications of one table."""

    @property
    def connected(self) -> bool:
        """True while the connection is open."""

    def connect(self) -> None:
        """Open the connection and start listening; raises when the database is down."""

    def wait(self, timeout: float) -> list[str] | None:
        """Wait up to ``timeout`` seconds; the payloads that arrived (``[]`` if none).

        Returns None when not connected. Raises when the connection breaks (the caller
        closes it and connects again later).
        """

    def close(self) -> None:
        """Close the connection; harmless when it is not open."""


class Backend(Protocol):
    """What dbcancel needs from an ORM. Every method that touches the database runs at
    most one transaction of its own (or joins the caller's, for ``using``)."""

    key: Hashable
    """Identifies the database and table, so that jobs of one table are found in-process."""
    model_name: str
    """The model's name, for messages."""
    label: str
    """The model and its database (``Analysis@postgresql``), for logs and thread names."""

    def check_id(self, job_id: Any) -> None:
        """Raise :class:`TypeError` when ``job_id`` cannot be an id of this table."""

    def check_filters(self, filters: Mapping[str, Any] | None) -> None:
        """Raise :class:`ValueError` when a filter names a column the table lacks."""

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Any = None,
    ) -> int:
        """Apply ``change`` as one conditional UPDATE and commit; return the row count.

        ``job_id=None`` applies it to every row matching ``filters``. ``using`` is a
        caller's open transaction (session or connection) to run in, uncommitted.
        """

    def read(self, job_id: Any, filters: Mapping[str, Any] | None = None) -> JobRow | None:
        """One job's row, or None when no row has this id (and matches ``filters``)."""

    def read_many(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """The rows of those jobs that still exist, by id."""

    def mark_stopped(self, job_id: Any, observed_at: dt.datetime | None = None) -> None:
        """Set ``finished_at`` to now where it is still null, and commit.

        ``observed_at`` (when the worker saw the cancel) goes to ``cancel_observed_at``
        in the same UPDATE, unless that already holds an earlier value.
        """

    def beat(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """Stamp ``heartbeat_at`` on those rows, whatever their status; return them by id.

        Rows missing from the result were deleted. One ``UPDATE ... RETURNING`` where
        the database has it, else an UPDATE and a SELECT in one transaction.
        """

    def reap(self, cutoff: dt.datetime, error: str) -> int:
        """Stop the jobs whose worker is gone; return how many, in one conditional UPDATE.

        Rows not yet stopped (``finished_at`` null) whose ``heartbeat_at`` (or, when
        null, ``started_at``) is older than ``cutoff`` get ``finished_at``; those in
        progress also become failed with ``error``; cancelled ones stay cancelled.
        """

    def release(self) -> None:
        """The calling thread is done with the database for now (a worker's run ended, an
        executor thread did one round trip): give back what the ORM keeps per thread.
        SQLAlchemy pools connections per engine and keeps nothing: a no-op there."""

    def listener(self) -> Listener | None:
        """A new listener for this table's cancel notifications; None when the database
        has no push (only PostgreSQL has)."""
