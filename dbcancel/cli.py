"""The command line: ``python -m dbcancel demo|cancel|status|list|reap`` (or ``dbcancel ...``).

``demo`` runs :func:`dbcancel.demo.run_demo`. ``cancel``, ``status``, ``list`` and ``reap``
work on an existing job table of any app: the table is reflected from the database, so
they need nothing but its URL and name (``--url``/``$DBCANCEL_URL``,
``--table``/``$DBCANCEL_TABLE``).
Only the standard library and SQLAlchemy are used. Passwords in URLs are never printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Column, Engine, MetaData, Table, create_engine, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError, SQLAlchemyError

from . import __version__
from .demo import DemoError, format_table, run_demo
from .errors import JobNotFound
from .jobs import Jobs
from .models import TERMINAL, Status

__all__ = [
    "ENV_TABLE",
    "ENV_URL",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "CommandError",
    "build_parser",
    "main",
    "parse_job_id",
]

EXIT_OK = 0
"""Success; for ``cancel``: the job is cancelled, by this call or an earlier one."""
EXIT_REFUSED = 1
"""``cancel`` refused (the job had already completed or failed); a ``demo`` check failed."""
EXIT_ERROR = 2
"""A usage error, or a job, table or database that cannot be found or reached."""
EXIT_INTERRUPTED = 130
"""Interrupted by Ctrl-C (128 + SIGINT, as shells report it)."""

ENV_URL = "DBCANCEL_URL"
"""The environment variable ``--url`` defaults to."""
ENV_TABLE = "DBCANCEL_TABLE"
"""The environment variable ``--table`` defaults to."""

_EXIT_STATUS = """\
exit status:
  0    success (cancel: the job is cancelled, by this call or an earlier one)
  1    cancel refused: the job had already completed or failed, nothing changed;
       demo: one of the demo's checks failed
  2    usage error, or an unknown job id, an unknown table, a database that
       cannot be reached (reported as one line on stderr, nothing changed)
  130  interrupted (Ctrl-C)
"""

_EPILOG = f"""\
examples:
  %(prog)s demo
  export {ENV_URL}=postgresql+psycopg://app@localhost/app {ENV_TABLE}=analysis
  %(prog)s list
  %(prog)s cancel 42 --reason "session deleted"
  %(prog)s status 42
  %(prog)s reap --stale-after 60

The table commands work on any table with dbcancel's columns (those of
CancellableMixin) and a one-column primary key. Times are UTC.
Passwords in URLs are never printed.

{_EXIT_STATUS}"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps multi-line text (examples, exit statuses)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CommandError(Exception):
    """A failure that ends a command with one line on stderr and exit status ``status``."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None, *, prog: str = "dbcancel") -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``prog`` is the program name shown in help and error lines.

    Never raises for a failure it can describe: usage errors, unknown jobs or tables
    and unreachable databases are reported on stderr (one line, no traceback) and turned
    into the exit statuses listed by ``--help``.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        status: int = args.handler(args)
    except SystemExit as exc:
        # argparse has already printed the help, version or usage error.
        return exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else 1
    except CommandError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


def build_parser(prog: str = "dbcancel") -> argparse.ArgumentParser:
    """The argument parser of :func:`main`; environment defaults are read now."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cancel, inspect, list and reap the jobs of a dbcancel job table, or run "
        "the demo.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_EXIT_STATUS,
            formatter_class=_HelpFormatter,
        )
        sub.set_defaults(parser=sub)
        return sub

    demo = command(
        "demo",
        "run the end-to-end demo (embedded SQLite by default)",
        "Analyse synthetic upload sessions in threads with a live progress display, delete "
        "one session midway (cancel, wait until its worker stopped, then delete its files) "
        "and print how every job ended. Runs for about five seconds.",
    )
    demo.add_argument(
        "--url",
        help="run on this database instead of a temporary SQLite file; the demo creates "
        "and drops its own two tables there (dbcancel_demo_<random>_*) and touches no other",
    )
    demo.add_argument("--jobs", type=_positive_int, default=4, metavar="N", help="sessions (4)")
    demo.add_argument(
        "--files", type=_positive_int, default=6, metavar="N", help="clips per session (6)"
    )
    demo.add_argument(
        "--interval",
        type=_positive_float,
        default=0.05,
        metavar="S",
        help="checkpoint poll interval in seconds (0.05)",
    )
    demo.set_defaults(handler=_demo)

    cancel = command(
        "cancel",
        "cancel a pending or running job",
        "Cancel a pending or in-progress job; the change is committed when this returns. "
        "A running worker stops at its next checkpoint.",
    )
    _table_arguments(cancel, with_id=True)
    cancel.add_argument("--reason", metavar="TEXT", help="stored in cancel_reason")
    cancel.set_defaults(handler=_cancel)

    status = command(
        "status",
        "print a job's status",
        "Print a job's status, one word: pending, in_progress, completed, failed or cancelled.",
    )
    _table_arguments(status, with_id=True)
    status.set_defaults(handler=_status)

    listing = command(
        "list",
        "list jobs (by default those not finished)",
        "List jobs in id order: id, status, started_at, cancel_requested_at, reason. "
        "By default only pending and in-progress jobs.",
    )
    _table_arguments(listing, with_id=False)
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="list jobs in every status")
    which.add_argument(
        "--status",
        choices=[s.value for s in Status],
        metavar="S",
        help="list jobs in status S (pending, in_progress, completed, failed, cancelled)",
    )
    listing.set_defaults(handler=_list)

    reap = command(
        "reap",
        "stop jobs whose worker died (no heartbeat for --stale-after seconds)",
        "For jobs whose worker died (a killed process, a lost machine): in-progress jobs "
        "whose last heartbeat is older than --stale-after seconds become failed, with the "
        "error 'worker lost', and cancelled jobs whose worker never stopped are marked "
        "stopped (finished_at), so that wait() and delete flows stop waiting for them. "
        "Heartbeats come from workers running with Jobs(watch=True), once per poll "
        "interval; a job whose worker does not beat looks dead once it has run for "
        "--stale-after seconds. Run it from cron or a scheduler.",
    )
    _table_arguments(reap, with_id=False)
    add_stale_after(reap)
    reap.set_defaults(handler=_reap)
    return parser


def _table_arguments(sub: argparse.ArgumentParser, *, with_id: bool) -> None:
    if with_id:
        sub.add_argument("id", metavar="ID", help="the job's primary key")
    sub.add_argument(
        "--url",
        default=os.environ.get(ENV_URL),
        help=f"SQLAlchemy database URL (default: ${ENV_URL})",
    )
    sub.add_argument(
        "--table",
        default=os.environ.get(ENV_TABLE),
        metavar="NAME",
        help=f"the job table, NAME or SCHEMA.NAME (default: ${ENV_TABLE})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)  # prints usage and message, exits with status 2


# -- commands ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    url: str | None = args.url
    safe = "the demo's database"
    if url is not None:
        parsed = _parse_url(args, url)
        safe = parsed.render_as_string(hide_password=True)
    try:
        run_demo(url, jobs=args.jobs, files=args.files, interval=args.interval)
    except DemoError as exc:
        raise CommandError(f"demo check failed: {exc}", EXIT_REFUSED) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except ImportError as exc:
        raise CommandError(f"cannot use {safe}: its database driver is missing ({exc})") from None
    except SQLAlchemyError as exc:
        password = None if url is None else make_url(url).password
        raise CommandError(f"database error on {safe}: {_reason(exc, password)}") from None
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    with _open(args) as (_, table, jobs):
        job_id = _job_id(args, table)
        label = f"{table.name} {job_id}"
        try:
            # Read first only to word the answer; cancel() itself decides, atomically.
            before = jobs.status(job_id)
            cancelled = jobs.cancel(job_id, reason=args.reason)
            after = before if cancelled else jobs.status(job_id)
        except JobNotFound as exc:
            raise CommandError(str(exc)) from None
    if not cancelled:
        print(f"{label}: not cancelled: it is {after.value}")
        return EXIT_REFUSED
    if before is Status.CANCELLED:
        print(f"{label}: already cancelled")
    elif before is Status.IN_PROGRESS:
        print(f"{label}: cancelled (it was in progress: its worker stops at its next checkpoint)")
    else:
        print(f"{label}: cancelled")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    with _open(args) as (_, table, jobs):
        job_id = _job_id(args, table)
        try:
            status = jobs.status(job_id)
        except JobNotFound as exc:
            raise CommandError(str(exc)) from None
    print(status.value)
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    with _open(args) as (engine, table, _):
        c = table.c
        pk = _primary_key(table)
        stmt = select(pk, c.status, c.started_at, c.cancel_requested_at, c.cancel_reason)
        if args.status:
            stmt = stmt.where(c.status == args.status)
            what = f"{args.status} jobs"
        elif not args.all:
            stmt = stmt.where(c.status.not_in(sorted(s.value for s in TERMINAL)))
            what = "pending or in_progress jobs"
        else:
            what = "jobs"
        with engine.connect() as conn:
            rows = conn.execute(stmt.order_by(pk)).all()
    if not rows:
        print(f"no {what} in {table.name}")
        return EXIT_OK
    print(
        format_table(
            ["id", "status", "started_at", "cancel_requested_at", "reason"],
            [[str(r[0]), str(r[1]), _when(r[2]), _when(r[3]), _text(r[4])] for r in rows],
            right="0",
        )
    )
    return EXIT_OK


def _reap(args: argparse.Namespace) -> int:
    # --stale-after was checked by argparse, so reap() has nothing left to refuse.
    with _open(args) as (_, table, jobs):
        count = jobs.reap(stale_after=args.stale_after)
    print(reap_summary(count, table.name, args.stale_after))
    return EXIT_OK


def reap_summary(count: int, name: str, stale_after: float) -> str:
    """The line every ``reap`` command prints: ``reaped 2 jobs of analysis (...)``."""
    noun = "job" if count == 1 else "jobs"
    return f"reaped {count} {noun} of {name} (no heartbeat for {stale_after:g}s)"


def add_stale_after(parser: argparse.ArgumentParser) -> None:
    """The required ``--stale-after SECONDS`` of every argparse ``reap`` command."""
    parser.add_argument(
        "--stale-after",
        type=_positive_float,
        required=True,
        metavar="SECONDS",
        help="reap jobs with no heartbeat for this many seconds; make it several poll "
        "intervals, so that a slow poll does not look like a dead worker",
    )


# -- database access --------------------------------------------------------------------


@contextmanager
def _open(args: argparse.Namespace) -> Iterator[tuple[Engine, Table, Jobs]]:
    """Connect, reflect the table and wrap it in ``Jobs``; disposes the engine after."""
    if not args.url:
        _usage(args, f"--url is required (or set {ENV_URL})")
    if not args.table:
        _usage(args, f"--table is required (or set {ENV_TABLE})")
    url = _parse_url(args, args.url)
    safe = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        path = url.database or ""
        # SQLite would create a missing file: a typo must not leave an empty database.
        on_disk = path not in ("", ":memory:") and not path.startswith("file:")
        if on_disk and not Path(path).exists():
            raise CommandError(f"no SQLite database file at {path} (--url {safe})")
    try:
        engine = create_engine(url)
    except ImportError as exc:
        raise CommandError(f"cannot use {safe}: its database driver is missing ({exc})") from None
    except ArgumentError as exc:
        raise CommandError(f"cannot use {safe}: {_reason(exc, url.password)}") from None
    try:
        try:
            with engine.connect():
                pass
        except DBAPIError as exc:
            raise CommandError(f"cannot connect to {safe}: {_reason(exc, url.password)}") from None
        table = _reflect(engine, args.table, safe)
        try:
            jobs = Jobs(engine, table)
        except TypeError as exc:
            raise CommandError(f"{exc} (table in {safe})") from None
        yield engine, table, jobs
    except SQLAlchemyError as exc:
        raise CommandError(f"database error on {safe}: {_reason(exc, url.password)}") from None
    finally:
        engine.dispose()


def _parse_url(args: argparse.Namespace, text: str) -> URL:
    try:
        return make_url(text)
    except ArgumentError:
        # SQLAlchemy's own message repeats the string, password included.
        _usage(
            args,
            "--url is not a database URL; expected e.g. postgresql+psycopg://user@host/dbname "
            "or sqlite:///path/to/file.db",
        )


def _reflect(engine: Engine, qualified: str, safe: str) -> Table:
    schema, _, name = qualified.rpartition(".")
    metadata = MetaData()
    try:
        metadata.reflect(engine, only=[name], schema=schema or None)
    except InvalidRequestError:
        try:
            names = inspect(engine).get_table_names(schema=schema or None)
        except SQLAlchemyError:
            names = []
        hint = f" (its tables: {', '.join(sorted(names)[:12])})" if names else ""
        raise CommandError(f"no table {qualified!r} in {safe}{hint}") from None
    return metadata.tables[f"{schema}.{name}" if schema else name]


def _primary_key(table: Table) -> Column[Any]:
    # Jobs() has already refused tables without exactly one primary key column.
    return next(iter(table.primary_key.columns))


def parse_job_id(table: Table, text: str) -> Any:
    """``text`` converted to the primary key's Python type (int for integer keys).

    Raises :class:`ValueError` naming the table when it cannot be one of its ids. Shared
    with ``flask dbcancel``.
    """
    try:
        kind = _primary_key(table).type.python_type
    except NotImplementedError:
        return text
    if kind is str:
        return text
    try:
        return kind(text)
    except (TypeError, ValueError, ArithmeticError):
        kinds = {int: "integers", uuid.UUID: "UUIDs"}.get(kind, f"{kind.__name__} values")
        raise ValueError(f"{table.name} ids are {kinds}; {text!r} is not one") from None


def _job_id(args: argparse.Namespace, table: Table) -> Any:
    """The ID argument converted to the primary key's Python type."""
    try:
        return parse_job_id(table, args.id)
    except ValueError as exc:
        _usage(args, str(exc))


def _reason(exc: Exception, password: str | None) -> str:
    """The first line of a database error, without SQLAlchemy's SQL echo and links."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    # A driver may echo its connection string; the password must not reach a log.
    return line.replace(password, "***") if password else line


def _when(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        # dbcancel stores UTC; databases without time zones give it back naive.
        utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _text(value: Any, limit: int = 60) -> str:
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
