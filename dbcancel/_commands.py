"""The table commands of every dbcancel command line, written once.

`python -m dbcancel` (`dbcancel.cli`), `flask dbcancel`
([`dbcancel.contrib.flask`][dbcancel.contrib.flask]) and `manage.py dbcancel` (the Django management
command) only parse their arguments and open their table; `cancel`, `status`,
`list_jobs` and `reap` do the work and return an `Outcome`, which
`emit` prints the same way for all three: `out` on stdout, `PROG: err` on stderr,
and `status` as the exit status.

The commands speak to a Jobs-like object ([`Jobs`][dbcancel.Jobs] or
[`dbcancel.contrib.django.DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs]) and to a
`Rows` reader for what `list` and `status` show. This module imports neither SQLAlchemy nor
Django: `SQLAlchemyRows` imports SQLAlchemy when it is built, and the Django reader lives
with the Django command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TextIO

from .errors import JobNotFound
from .models import TERMINAL, Status

if TYPE_CHECKING:
    from sqlalchemy import Engine, Table

__all__ = [
    "ALL_HELP",
    "CANCEL_HELP",
    "CANCEL_SUMMARY",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "LIST_HEADERS",
    "LIST_HELP",
    "LIST_SUMMARY",
    "REAP_HELP",
    "REAP_SUMMARY",
    "REASON_HELP",
    "STALE_AFTER_HELP",
    "STATUS_HELP",
    "STATUS_OPTION_HELP",
    "STATUS_SUMMARY",
    "WORKER_COLUMN",
    "JobDetail",
    "JobsLike",
    "Outcome",
    "Rows",
    "SQLAlchemyRows",
    "add_stale_after",
    "cancel",
    "db_reason",
    "emit",
    "format_table",
    "id_kind_error",
    "interrupted",
    "list_jobs",
    "positive_seconds",
    "reap",
    "reap_summary",
    "sqlalchemy_id",
    "status",
    "status_lines",
]

EXIT_OK = 0
"""Success; for `cancel`: the job is cancelled, by this call or an earlier one."""
EXIT_REFUSED = 1
"""`cancel` refused (the job had already completed or failed); a `demo` check failed."""
EXIT_ERROR = 2
"""A usage error, or a job, table or database that cannot be found or reached."""
EXIT_INTERRUPTED = 130
"""Interrupted by Ctrl-C (128 + SIGINT, as shells report it)."""

WORKER_COLUMN = "worker_id"
"""The optional column naming the worker (`host:pid:token`) that runs a job."""

LIST_HEADERS = ("id", "status", "started", "finished", "worker", "reason/error")
"""The columns of `list`, in every command line."""

_REASON_WIDTH = 40
_WORKER_WIDTH = 32
_NOT_STOPPED = ("pending", "in_progress")


class JobDetail(NamedTuple):
    """One job's row as `list` and `status` show it.

    `status` is the column's text; `worker` is None when the table has no
    `worker_id` column or the row holds none.
    """

    id: Any
    status: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    cancel_reason: str | None
    error: str | None
    worker: str | None


class Outcome(NamedTuple):
    """What a command prints and how it exits.

    `out` goes to stdout (one trailing newline added; nothing when empty); `err`, when
    not empty, to stderr after the program's name (`"dbcancel: error: ..."`).
    """

    status: int
    out: str = ""
    err: str = ""


class JobsLike(Protocol):
    """What the commands need of [`Jobs`][dbcancel.Jobs] or `DjangoJobs`."""

    def cancel(self, job_id: Any, *, reason: str | None = None) -> bool:
        """Cancel a pending or running job; False when it had already finished."""

    def status(self, job_id: Any) -> Status:
        """The job's status; raises [`JobNotFound`][dbcancel.JobNotFound]."""

    def reap(self, stale_after: float) -> int:
        """Stop the jobs whose worker is gone; return how many."""


class Rows(Protocol):
    """Reads job rows for `list` and `status`: the one seam to each ORM."""

    label: str
    """The table's name, as every message shows it."""
    errors: tuple[type[BaseException], ...]
    """The ORM's database errors: a command reports them as one line, exit status 2."""

    def parse_id(self, text: str) -> Any:
        """`text` as a primary key value; `ValueError` (see `id_kind_error`)
        when it cannot be one."""

    def one(self, job_id: Any) -> JobDetail | None:
        """The job's row, or None when there is none."""

    def many(self, statuses: Collection[str] | None) -> list[JobDetail]:
        """The rows whose status is one of `statuses` (every row for None), by id."""

    def describe(self, exc: BaseException) -> str:
        """One line for a database error of `errors`, with no password in it."""


# -- help texts, the same in every command line ----------------------------------------

CANCEL_SUMMARY = "cancel a pending or running job"
"""One line on `cancel`, in every command line's list of commands."""
CANCEL_HELP = (
    "Cancel a pending or in-progress job; the change is committed when this returns. "
    "A running worker stops at its next checkpoint. Exit status 1 when the job had "
    "already completed or failed (nothing changed), 2 when there is no such job."
)
"""The help of `cancel`."""
REASON_HELP = "stored in cancel_reason"
"""The help of `cancel --reason`."""
STATUS_SUMMARY = "show a job's status, error or cancel reason, start and end"
"""One line on `status`."""
STATUS_HELP = (
    "Print a job's status (pending, in_progress, completed, failed or cancelled) as "
    "'TABLE ID: STATUS', then, when the row has them, its error (failed) or cancel reason "
    "(cancelled), when it started, its last heartbeat while it has not stopped, when it "
    "finished, and its worker (host:pid:token, from a worker_id column). Times are UTC. "
    "Read-only."
)
"""The help of `status`."""
LIST_SUMMARY = "list jobs (by default those not finished)"
"""One line on `list`."""
LIST_HELP = (
    f"List jobs in id order, with the columns {', '.join(LIST_HEADERS)}: 'finished' is "
    "when the job stopped, or 'beat TIME', its last heartbeat, while it runs; 'worker' "
    "comes from a worker_id column when the table has one (else '-'); 'reason/error' is "
    "the cancel reason or the error, cut to 40 characters. By default only pending and "
    "in-progress jobs. Times are UTC. Read-only."
)
"""The help of `list`."""
ALL_HELP = "list jobs in every status"
"""The help of `list --all`."""
STATUS_OPTION_HELP = "list jobs in status S (pending, in_progress, completed, failed, cancelled)"
"""The help of `list --status`."""
REAP_SUMMARY = "stop jobs whose worker died (no heartbeat for --stale-after seconds)"
"""One line on `reap`."""
REAP_HELP = (
    "For jobs whose worker died (a killed process, a lost machine): in-progress jobs "
    "whose worker's last heartbeat is older than --stale-after seconds and than three of "
    "that worker's own heartbeat periods become failed, with the error 'worker lost', "
    "and cancelled jobs whose worker never stopped are marked stopped (finished_at), so "
    "that wait() and delete flows stop waiting for them. Every process running jobs "
    "beats its row of the worker table every heartbeat period (10 s by default), on the "
    "database's clock, and each beat records until when it counts as alive: a short "
    "--stale-after never fails a live worker, it only lets dead ones go sooner. Rows of "
    "a worker table that predates that record (migrate it: op.upgrade_cancellation(), "
    "or manage.py migrate dbcancel) are judged by --stale-after alone; there, make it at "
    "least three periods. A worker that was only stalled finds its jobs taken away and "
    "stops. Run it from cron or a scheduler."
)
"""The help of `reap`."""
STALE_AFTER_HELP = (
    "reap jobs whose worker has not beaten for this many seconds, nor within three of "
    "its own heartbeat periods (a floor: live workers are never reaped sooner)"
)
"""The help of `reap --stale-after`, on every command line."""


# -- the commands -----------------------------------------------------------------------


def cancel(jobs: JobsLike, rows: Rows, text_id: str, reason: str | None) -> Outcome:
    """`cancel ID [--reason TEXT]`: exit 0 when cancelled (now or before), 1 when the
    job had already completed or failed, 2 when it does not exist."""

    def run() -> Outcome:
        try:
            job_id = rows.parse_id(text_id)
        except ValueError as exc:  # an ID that cannot be one of the table's
            return _error(str(exc))
        label = f"{rows.label} {job_id}"
        try:
            # Read first only to word the answer; cancel() itself decides, atomically.
            before = jobs.status(job_id)
            cancelled = jobs.cancel(job_id, reason=reason)
            after = before if cancelled else jobs.status(job_id)
        except JobNotFound:
            return _error(f"{label} not found; nothing was changed")
        if not cancelled:
            return Outcome(EXIT_REFUSED, f"{label}: not cancelled: it is {after.value}")
        if before is Status.CANCELLED:
            return Outcome(EXIT_OK, f"{label}: already cancelled")
        if before is Status.IN_PROGRESS:
            return Outcome(
                EXIT_OK,
                f"{label}: cancelled (it was in progress: its worker stops at its next checkpoint)",
            )
        return Outcome(EXIT_OK, f"{label}: cancelled")

    return _guarded(rows, run)


def status(jobs: JobsLike, rows: Rows, text_id: str) -> Outcome:
    """`status ID`: the status on the first line (`analysis 7: failed`), then, when
    the row has them, the error or cancel reason, the start, the last heartbeat of a job
    not yet stopped, the end (`finished_at`) and the worker. Read-only."""

    def run() -> Outcome:
        try:
            job_id = rows.parse_id(text_id)
        except ValueError as exc:  # an ID that cannot be one of the table's
            return _error(str(exc))
        label = f"{rows.label} {job_id}"
        try:
            jobs.status(job_id)  # refuses ids of the wrong type or out of range first
        except JobNotFound:
            return _error(f"{label} not found")
        row = rows.one(job_id)
        if row is None:  # deleted in between
            return _error(f"{label} not found")
        return Outcome(EXIT_OK, "\n".join(status_lines(label, row)))

    return _guarded(rows, run)


def status_lines(label: str, row: JobDetail) -> list[str]:
    """The lines of `status` for one row."""
    lines = [f"{label}: {row.status}"]
    fields: list[tuple[str, str]] = []
    if row.status == Status.FAILED.value and row.error:
        fields.append(("error", row.error))
    if row.status == Status.CANCELLED.value and row.cancel_reason:
        fields.append(("reason", row.cancel_reason))
    if row.started_at is not None:
        fields.append(("started", _when(row.started_at)))
    if row.finished_at is None and row.heartbeat_at is not None:
        fields.append(("heartbeat", _when(row.heartbeat_at)))
    if row.finished_at is not None:
        fields.append(("finished", _when(row.finished_at)))
    if row.worker:
        fields.append(("worker", row.worker))
    for name, value in fields:
        head = f"  {name + ':':<11}"
        text_lines = str(value).splitlines() or [""]
        lines.append(head + text_lines[0])
        lines.extend(" " * len(head) + more for more in text_lines[1:])
    return lines


def list_jobs(rows: Rows, *, every: bool = False, status: str | None = None) -> Outcome:
    """`list [--all | --status S]`: a table of the jobs pending or in progress (every
    job with `every`, those in `status` with it), in id order. Read-only."""

    def run() -> Outcome:
        if status is not None:
            found = rows.many([status])
            what = f"{status} jobs"
        elif not every:
            found = rows.many([s.value for s in Status if s not in TERMINAL])
            what = " or ".join(_NOT_STOPPED) + " jobs"
        else:
            found = rows.many(None)
            what = "jobs"
        if not found:
            return Outcome(EXIT_OK, f"no {what} in {rows.label}")
        return Outcome(EXIT_OK, format_table(LIST_HEADERS, [_cells(r) for r in found], right="0"))

    return _guarded(rows, run)


def reap(jobs: JobsLike, rows: Rows, stale_after: float) -> Outcome:
    """`reap --stale-after SECONDS`: one summary line (`stale_after` already checked)."""

    def run() -> Outcome:
        count = jobs.reap(stale_after=stale_after)
        return Outcome(EXIT_OK, reap_summary(count, rows.label, stale_after))

    return _guarded(rows, run)


def reap_summary(count: int, name: str, stale_after: float) -> str:
    """The line every `reap` command prints: `reaped 2 jobs of analysis (...)`."""
    noun = "job" if count == 1 else "jobs"
    return f"reaped {count} {noun} of {name} (no heartbeat for {stale_after:g}s)"


def emit(
    outcome: Outcome,
    prog: str,
    *,
    stdout: Callable[[str], object] | None = None,
    stderr: Callable[[str], object] | None = None,
) -> int:
    """Print `outcome` (`stdout`/`stderr` take one line each, with no newline;
    default: the process's streams) and return its exit status."""
    if outcome.out:
        (stdout or _writer(sys.stdout))(outcome.out)
    if outcome.err:
        (stderr or _writer(sys.stderr))(f"{prog}: {outcome.err}")
    return outcome.status


def interrupted() -> Outcome:
    """The outcome of a command stopped by Ctrl-C."""
    return Outcome(EXIT_INTERRUPTED, err="interrupted")


def _writer(stream: TextIO) -> Callable[[str], object]:
    return lambda text: print(text, file=stream, flush=True)


def _error(message: str) -> Outcome:
    return Outcome(EXIT_ERROR, err=f"error: {message}")


def _guarded(rows: Rows, run: Callable[[], Outcome]) -> Outcome:
    try:
        return run()
    except rows.errors as exc:
        return _error(rows.describe(exc))
    except KeyboardInterrupt:
        return interrupted()


# -- formatting -------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: str = "") -> str:
    """Lay `rows` out as an aligned plain-text table under `headers`.

    `right` lists, by index (`"03"`), the columns to align right (numbers);
    the others align left. The last line carries no trailing newline.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if str(i) in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join([line(headers), line(rule), *(line(r) for r in rows)])


def _cells(row: JobDetail) -> list[str]:
    if row.finished_at is not None:
        finished = _when(row.finished_at)
    elif row.heartbeat_at is not None:
        finished = "beat " + _when(row.heartbeat_at)
    else:
        finished = "-"
    note = row.error if row.status == Status.FAILED.value else row.cancel_reason
    return [
        str(row.id),
        row.status,
        _when(row.started_at),
        finished,
        _text(row.worker, _WORKER_WIDTH),
        _text(note, _REASON_WIDTH),
    ]


def _when(value: Any) -> str:
    """A timestamp as `2026-01-31T12:00:00Z`; naive ones are UTC (dbcancel stores UTC)."""
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _text(value: Any, limit: int) -> str:
    """`value` on one line, cut to `limit` characters; `-` for None or blank."""
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    if not text:
        return "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- arguments --------------------------------------------------------------------------


def positive_seconds(text: str) -> float:
    """`--stale-after` and `--interval`: a finite number of seconds > 0.

    Raises `argparse.ArgumentTypeError`, which argparse reports as a usage error.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def add_stale_after(parser: argparse.ArgumentParser) -> None:
    """The required `--stale-after SECONDS` of every argparse `reap` command."""
    parser.add_argument(
        "--stale-after",
        type=positive_seconds,
        required=True,
        metavar="SECONDS",
        help=STALE_AFTER_HELP,
    )


def id_kind_error(label: str, kind: type | None, text: str) -> ValueError:
    """The error for an ID that cannot be a key of `label` (keys of type `kind`)."""
    kinds = {int: "integers", uuid.UUID: "UUIDs"}.get(kind) if kind is not None else None
    if kinds is None:
        kinds = f"{kind.__name__} values" if kind is not None else "other values"
    return ValueError(f"{label} ids are {kinds}; {text!r} is not one")


# -- SQLAlchemy -------------------------------------------------------------------------


class SQLAlchemyRows:
    """`Rows` of a SQLAlchemy table, for `python -m dbcancel` and `flask dbcancel`.

    `table` has dbcancel's columns and a one-column primary key (`Jobs` has checked
    them); a `worker_id` column is shown when it has one. SQLAlchemy is imported here,
    when the reader is built, never by the module.
    """

    def __init__(self, engine: Engine, table: Table) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        self.engine = engine
        """The engine the rows are read through."""
        self.table = table
        """The job table."""
        self.label = table.name
        """The table's name, as every message shows it."""
        self.errors: tuple[type[BaseException], ...] = (SQLAlchemyError,)
        """SQLAlchemy's errors, reported as one line."""
        self._pk = next(iter(table.primary_key.columns))

    def parse_id(self, text: str) -> Any:
        """`text` converted to the primary key's Python type (int for integer keys)."""
        return sqlalchemy_id(self.table, text)

    def _select(self) -> Any:
        """The columns of a job, with its worker's last heartbeat (from the worker
        table, where the job names one) in place of the row's own `heartbeat_at`."""
        from sqlalchemy import MetaData, func, inspect, literal, select

        from ._mixin import worker_table
        from .models import WORKER_TABLE

        c = self.table.c
        worker = c[WORKER_COLUMN] if WORKER_COLUMN in c else literal(None)
        beat: Any = c.heartbeat_at
        if WORKER_COLUMN in c and inspect(self.engine).has_table(
            WORKER_TABLE, schema=self.table.schema
        ):
            w = worker_table(MetaData(), self.table.schema).c
            latest = select(w.heartbeat_at).where(w.id == c[WORKER_COLUMN]).scalar_subquery()
            beat = func.coalesce(latest, c.heartbeat_at).label("heartbeat_at")
        return select(
            self._pk,
            c.status,
            c.started_at,
            c.finished_at,
            beat,
            c.cancel_reason,
            c.error,
            worker,
        )

    def one(self, job_id: Any) -> JobDetail | None:
        """The job's row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(self._pk == job_id)).first()
        return None if row is None else _detail(row)

    def many(self, statuses: Collection[str] | None) -> list[JobDetail]:
        """The rows in `statuses` (every row for None), in id order."""
        stmt = self._select()
        if statuses is not None:
            stmt = stmt.where(self.table.c.status.in_(sorted(statuses)))
        with self.engine.connect() as conn:
            return [_detail(r) for r in conn.execute(stmt.order_by(self._pk)).all()]

    def describe(self, exc: BaseException) -> str:
        """`database error on URL: first line of the driver's message`."""
        url = self.engine.url
        return f"database error on {url.render_as_string(hide_password=True)}: " + db_reason(
            exc, url.password
        )


def sqlalchemy_id(table: Table, text: str) -> Any:
    """`text` converted to the Python type of `table`'s primary key (int for integer
    keys); `ValueError` naming the table when it cannot be one of its ids."""
    pk = next(iter(table.primary_key.columns))
    try:
        kind = pk.type.python_type
    except NotImplementedError:
        return text
    if kind is str:
        return text
    try:
        return kind(text)
    except (TypeError, ValueError, ArithmeticError):
        raise id_kind_error(table.name, kind, text) from None


def _detail(row: Sequence[Any]) -> JobDetail:
    job_id, status_, started, finished, beat, reason, error, worker = row
    return JobDetail(
        job_id,
        str(getattr(status_, "value", status_)),
        started,
        finished,
        beat,
        reason,
        error,
        None if worker is None else str(worker),
    )


def db_reason(exc: BaseException, password: str | None) -> str:
    """The first line of a database error, without SQLAlchemy's SQL echo and links.

    `password` is masked: a driver may echo its connection string into a log.
    """
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line.replace(password, "***") if password else line
