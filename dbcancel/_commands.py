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
import time
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
    "EVERY_HELP",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "LIST_HEADERS",
    "LIST_HELP",
    "LIST_SUMMARY",
    "ONCE_HELP",
    "REAP_HELP",
    "REAP_SUMMARY",
    "REASON_HELP",
    "STALE_AFTER_HELP",
    "STATUS_HELP",
    "STATUS_OPTION_HELP",
    "STATUS_SUMMARY",
    "TOP_HEADERS",
    "TOP_HELP",
    "TOP_SUMMARY",
    "WORKERS_HEADERS",
    "WORKERS_HELP",
    "WORKERS_SUMMARY",
    "WORKER_COLUMN",
    "ActiveDetail",
    "FleetRows",
    "JobDetail",
    "JobsLike",
    "Outcome",
    "Rows",
    "SQLAlchemyRows",
    "WorkerDetail",
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
    "top",
    "top_frame",
    "workers",
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


class WorkerDetail(NamedTuple):
    """One row of the worker table as `workers` shows it.

    `running` counts the jobs of the command's table that name this worker and have
    not stopped (None when the table has no `worker_id` column).
    """

    id: str
    heartbeat_at: dt.datetime
    expires_at: dt.datetime | None
    running: int | None


class ActiveDetail(NamedTuple):
    """A job that has started and not stopped, as `top` shows it: in progress, or
    cancelled while its worker has not stopped yet."""

    id: Any
    status: str
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    cancel_requested_at: dt.datetime | None
    cancel_reason: str | None
    worker: str | None


class FleetRows(Protocol):
    """What `workers` and `top` read: a `Rows` that also sees the worker table."""

    label: str
    """The table's name, as every message shows it."""
    errors: tuple[type[BaseException], ...]
    """The ORM's database errors: a command reports them as one line, exit status 2."""

    def workers(self) -> tuple[dt.datetime, list[WorkerDetail]] | None:
        """The database's clock and every worker row, by id; None without a worker table."""

    def active(self) -> tuple[dt.datetime, list[ActiveDetail]]:
        """The database's clock and the jobs started and not stopped, by id."""

    def describe(self, exc: BaseException) -> str:
        """One line for a database error of `errors`, with no password in it."""


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


WORKERS_HEADERS = ("host", "pid", "jobs", "beat age", "period", "state")
"""The columns of `workers`, in every command line."""
WORKERS_SUMMARY = "list the worker processes and their heartbeats"
"""One line on `workers`."""
WORKERS_HELP = (
    f"List the rows of the worker table (one per process that ran jobs), with the "
    f"columns {', '.join(WORKERS_HEADERS)}: 'jobs' counts the jobs of this table the "
    "worker runs now (not stopped), 'beat age' the time since its last heartbeat on the "
    "database's clock, 'period' its heartbeat period (from the expiry its last beat "
    "recorded), 'state' 'alive' until that expiry, then 'expired' (reap() may take its "
    "jobs). Read-only."
)
"""The help of `workers`."""
TOP_HEADERS = ("id", "status", "age", "beat age", "worker", "cancel")
"""The columns of `top`, in every command line."""
TOP_SUMMARY = "show the jobs running now, refreshed (--once: print once)"
"""One line on `top`."""
TOP_HELP = (
    f"Show the jobs that have started and not stopped, with the columns "
    f"{', '.join(TOP_HEADERS)}: 'age' since the job started, 'beat age' since its "
    "worker's last heartbeat, 'cancel' '-' or how long ago a cancel was requested (and "
    "why) while its worker has not stopped yet. Ages are on the database's clock. "
    "Refreshed every --every seconds until Ctrl-C; --once prints once and exits. "
    "Read-only."
)
"""The help of `top`."""
EVERY_HELP = "seconds between two refreshes of top (2)"
"""The help of `top --every`."""
ONCE_HELP = "print once and exit (for scripts)"
"""The help of `top --once`."""


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


def workers(rows: FleetRows) -> Outcome:
    """`workers`: a table of the worker rows (see `WORKERS_HELP`). Read-only."""

    def run() -> Outcome:
        found = rows.workers()
        if found is None:
            return Outcome(EXIT_OK, f"no worker table beside {rows.label}: no job has run yet")
        now, listed = found
        if not listed:
            return Outcome(EXIT_OK, f"no workers beside {rows.label}")
        return Outcome(
            EXIT_OK, format_table(WORKERS_HEADERS, [_worker_cells(now, w) for w in listed], "1234")
        )

    return _fleet_guarded(rows, run)


def top_frame(rows: FleetRows) -> str:
    """One screen of `top`: a title line, then the table of running jobs."""
    now, active = rows.active()
    stopping = sum(1 for a in active if a.status == Status.CANCELLED.value)
    title = (
        f"{rows.label}: {len(active) - stopping} in progress, {stopping} cancelled and "
        f"stopping, at {_when(now)}"
    )
    if not active:
        return title
    cells = [_active_cells(now, a) for a in active]
    return title + "\n" + format_table(TOP_HEADERS, cells, right="023")


def top(
    rows: FleetRows,
    *,
    every: float = 2.0,
    once: bool = False,
    show: Callable[[str], object] | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> Outcome:
    """`top [--every S] [--once]`: with `once`, the frame as the outcome; else each
    frame to `show` every `every` seconds until Ctrl-C (exit status 130)."""

    def run() -> Outcome:
        if once:
            return Outcome(EXIT_OK, top_frame(rows))
        out = show or _writer(sys.stdout)
        while True:
            out(top_frame(rows))
            sleep(every)

    return _fleet_guarded(rows, run)


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


def _fleet_guarded(rows: FleetRows, run: Callable[[], Outcome]) -> Outcome:
    try:
        return run()
    except rows.errors as exc:
        return _error(rows.describe(exc))
    except KeyboardInterrupt:
        return interrupted()


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


def _worker_cells(now: dt.datetime, w: WorkerDetail) -> list[str]:
    host, _, rest = w.id.partition(":")
    pid = rest.partition(":")[0] or "-"
    period = "-"
    state = "-"
    if w.expires_at is not None:
        lifetime = _seconds(w.heartbeat_at, w.expires_at)
        if lifetime is not None:
            from .backend import MISSED_BEATS

            period = _age(lifetime / MISSED_BEATS)
        expired = _seconds(w.expires_at, now)
        state = "expired" if expired is not None and expired > 0 else "alive"
    running = "-" if w.running is None else str(w.running)
    return [host or "-", pid, running, _age(_seconds(w.heartbeat_at, now)), period, state]


def _active_cells(now: dt.datetime, a: ActiveDetail) -> list[str]:
    cancel = "-"
    if a.status == Status.CANCELLED.value:
        ago = _age(_seconds(a.cancel_requested_at, now))
        cancel = f"requested {ago} ago" + (f": {a.cancel_reason}" if a.cancel_reason else "")
    return [
        str(a.id),
        a.status,
        _age(_seconds(a.started_at, now)),
        _age(_seconds(a.heartbeat_at, now)),
        _text(a.worker, _WORKER_WIDTH),
        _text(cancel, _REASON_WIDTH + 20),
    ]


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _seconds(start: Any, end: Any) -> float | None:
    """`end - start` in seconds, naive timestamps taken as UTC; None when one is missing."""
    if not isinstance(start, dt.datetime) or not isinstance(end, dt.datetime):
        return None
    return (_utc(end) - _utc(start)).total_seconds()


def _age(seconds: float | None) -> str:
    """`0.4s`, `12s`, `3m05s`, `2h07m`, `3d04h`; `-` for None. A negative age (a clock
    a little behind another) shows as 0."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


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

    def _worker_table(self) -> Any:
        """The worker table beside the job table, or None when it does not exist."""
        from sqlalchemy import MetaData, inspect

        from ._mixin import worker_table
        from .models import WORKER_TABLE

        if not inspect(self.engine).has_table(WORKER_TABLE, schema=self.table.schema):
            return None
        return worker_table(MetaData(), self.table.schema)

    def workers(self) -> tuple[dt.datetime, list[WorkerDetail]] | None:
        """The database's clock and the worker rows, each with the number of this
        table's jobs it runs (not stopped), by id."""
        from sqlalchemy import func, literal, select

        from ._sqla import server_now

        w = self._worker_table()
        if w is None:
            return None
        c = self.table.c
        running: Any = literal(None)
        if WORKER_COLUMN in c:
            running = (
                select(func.count())
                .where(c[WORKER_COLUMN] == w.c.id, c.finished_at.is_(None))
                .where(c.status.in_([Status.IN_PROGRESS.value, Status.CANCELLED.value]))
                .scalar_subquery()
            )
        stmt = select(w.c.id, w.c.heartbeat_at, w.c.expires_at, running).order_by(w.c.id)
        with self.engine.connect() as conn:
            now = conn.execute(select(server_now())).scalar_one()
            rows = conn.execute(stmt).all()
        return now, [WorkerDetail(str(r[0]), r[1], r[2], r[3]) for r in rows]

    def active(self) -> tuple[dt.datetime, list[ActiveDetail]]:
        """The database's clock and the jobs started and not stopped, by id, each
        with its worker's last heartbeat where the worker table has it."""
        from sqlalchemy import func, literal, select

        from ._sqla import server_now

        c = self.table.c
        worker = c[WORKER_COLUMN] if WORKER_COLUMN in c else literal(None)
        beat: Any = c.heartbeat_at
        w = self._worker_table() if WORKER_COLUMN in c else None
        if w is not None:
            latest = select(w.c.heartbeat_at).where(w.c.id == c[WORKER_COLUMN]).scalar_subquery()
            beat = func.coalesce(latest, c.heartbeat_at)
        stmt = (
            select(
                self._pk,
                c.status,
                c.started_at,
                beat,
                c.cancel_requested_at,
                c.cancel_reason,
                worker,
            )
            .where(c.finished_at.is_(None), c.started_at.is_not(None))
            .where(c.status.in_([Status.IN_PROGRESS.value, Status.CANCELLED.value]))
            .order_by(self._pk)
        )
        with self.engine.connect() as conn:
            now = conn.execute(select(server_now())).scalar_one()
            rows = conn.execute(stmt).all()
        return now, [
            ActiveDetail(
                r[0],
                str(getattr(r[1], "value", r[1])),
                r[2],
                r[3],
                r[4],
                r[5],
                None if r[6] is None else str(r[6]),
            )
            for r in rows
        ]

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
