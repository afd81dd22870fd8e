"""The command line: `python -m dbcancel COMMAND` (or `dbcancel COMMAND`).

`demo` runs `dbcancel.demo.run_demo`. `cancel`, `status`, `list`, `reap`, `workers`
and `top` work on an existing job table of any app: the table is reflected from the database, so
they need nothing but its URL and name (`--url`/`$DBCANCEL_URL`,
`--table`/`$DBCANCEL_TABLE`).
Only the standard library and SQLAlchemy are used. Passwords in URLs are never printed.

The table commands themselves, their wording and their exit statuses live in
`dbcancel._commands`, shared with `flask dbcancel` and `manage.py dbcancel`;
this module parses arguments, reflects the table and prints the outcome.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

try:
    from sqlalchemy import Engine, MetaData, Table, create_engine, inspect
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import (
        ArgumentError,
        DBAPIError,
        InvalidRequestError,
        NoSuchModuleError,
        SQLAlchemyError,
    )
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "python -m dbcancel reflects tables through SQLAlchemy, which is not installed: "
        "pip install 'dbcancel[sqlalchemy]' (a Django project has manage.py dbcancel)"
    ) from err

from . import __version__
from . import _commands as commands
from ._commands import (
    ALL_HELP,
    CANCEL_HELP,
    CANCEL_SUMMARY,
    EVERY_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    LIST_HELP,
    LIST_SUMMARY,
    ONCE_HELP,
    REAP_HELP,
    REAP_SUMMARY,
    REASON_HELP,
    STATUS_HELP,
    STATUS_OPTION_HELP,
    STATUS_SUMMARY,
    TOP_HELP,
    TOP_SUMMARY,
    WORKERS_HELP,
    WORKERS_SUMMARY,
    Outcome,
    SQLAlchemyRows,
    db_reason,
    positive_seconds,
    sqlalchemy_id,
)
from ._commands import add_stale_after as add_stale_after  # shared with the Django command
from ._commands import reap_summary as reap_summary
from .demo import DemoError, run_demo
from .jobs import Jobs
from .models import Status

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
    "missing_driver",
    "parse_job_id",
]


ENV_URL = "DBCANCEL_URL"
"""The environment variable `--url` defaults to."""
ENV_TABLE = "DBCANCEL_TABLE"
"""The environment variable `--table` defaults to."""

_EXIT_STATUS = """\
exit status:
  0    success (cancel: the job is cancelled, by this call or an earlier one)
  1    cancel refused: the job had already completed or failed, nothing changed;
       demo: one of the demo's checks failed
  2    usage error, or an unknown job id, an unknown table, a database that
       cannot be reached or whose driver is not installed (reported as one
       line on stderr, nothing changed)
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
  %(prog)s workers
  %(prog)s top --every 1

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
    """A failure that ends a command with one line on stderr and exit status `status`."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None, *, prog: str = "dbcancel") -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit status.

    `prog` is the program name shown in help and error lines.

    Never raises for a failure it can describe: usage errors, unknown jobs or tables
    and unreachable databases are reported on stderr (one line, no traceback) and turned
    into the exit statuses listed by `--help`.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        outcome: Outcome = args.handler(args)
    except SystemExit as exc:
        # argparse has already printed the help, version or usage error.
        return exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else 1
    except CommandError as exc:
        outcome = Outcome(exc.status, err=f"error: {exc}")
    except KeyboardInterrupt:
        outcome = commands.interrupted()
    return commands.emit(outcome, parser.prog)


def build_parser(prog: str = "dbcancel") -> argparse.ArgumentParser:
    """The argument parser of `main`; environment defaults are read now."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cancel, inspect, list and reap the jobs of a dbcancel job table, or run "
        "the demo.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands_ = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands_.add_parser(
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
        type=positive_seconds,
        default=0.05,
        metavar="S",
        help="checkpoint poll interval in seconds (0.05)",
    )
    demo.set_defaults(handler=_demo)

    cancel = command("cancel", CANCEL_SUMMARY, CANCEL_HELP)
    _table_arguments(cancel, with_id=True)
    cancel.add_argument("--reason", metavar="TEXT", help=REASON_HELP)
    cancel.set_defaults(handler=_cancel)

    status = command("status", STATUS_SUMMARY, STATUS_HELP)
    _table_arguments(status, with_id=True)
    status.set_defaults(handler=_status)

    listing = command("list", LIST_SUMMARY, LIST_HELP)
    _table_arguments(listing, with_id=False)
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help=ALL_HELP)
    which.add_argument(
        "--status", choices=[s.value for s in Status], metavar="S", help=STATUS_OPTION_HELP
    )
    listing.set_defaults(handler=_list)

    reap = command("reap", REAP_SUMMARY, REAP_HELP)
    _table_arguments(reap, with_id=False)
    add_stale_after(reap)
    reap.set_defaults(handler=_reap)

    fleet = command("workers", WORKERS_SUMMARY, WORKERS_HELP)
    _table_arguments(fleet, with_id=False)
    fleet.set_defaults(handler=_workers)

    top = command("top", TOP_SUMMARY, TOP_HELP)
    _table_arguments(top, with_id=False)
    top.add_argument("--every", type=positive_seconds, default=2.0, metavar="S", help=EVERY_HELP)
    top.add_argument("--once", action="store_true", help=ONCE_HELP)
    top.set_defaults(handler=_top)
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


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)  # prints usage and message, exits with status 2


# -- commands ---------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> Outcome:
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
        raise CommandError(missing_driver(safe, exc)) from None
    except SQLAlchemyError as exc:
        password = None if url is None else make_url(url).password
        raise CommandError(f"database error on {safe}: {db_reason(exc, password)}") from None
    return Outcome(EXIT_OK)


def _cancel(args: argparse.Namespace) -> Outcome:
    with _open(args) as (jobs, rows):
        return commands.cancel(jobs, rows, args.id, args.reason)


def _status(args: argparse.Namespace) -> Outcome:
    with _open(args) as (jobs, rows):
        return commands.status(jobs, rows, args.id)


def _list(args: argparse.Namespace) -> Outcome:
    with _open(args) as (_, rows):
        return commands.list_jobs(rows, every=args.all, status=args.status)


def _reap(args: argparse.Namespace) -> Outcome:
    # --stale-after was checked by argparse, so reap() has nothing left to refuse.
    with _open(args) as (jobs, rows):
        return commands.reap(jobs, rows, args.stale_after)


def _workers(args: argparse.Namespace) -> Outcome:
    with _open(args) as (_, rows):
        return commands.workers(rows)


def _top(args: argparse.Namespace) -> Outcome:
    with _open(args) as (_, rows):
        return commands.top(rows, every=args.every, once=args.once, show=_screen())


def _screen() -> Any:
    """How `top` shows a frame: over the last one on a terminal, else after it."""
    if sys.stdout.isatty():
        return lambda text: print("\x1b[H\x1b[2J" + text, flush=True)
    return lambda text: print(text + "\n", flush=True)


# -- database access --------------------------------------------------------------------


@contextmanager
def _open(args: argparse.Namespace) -> Iterator[tuple[Jobs, SQLAlchemyRows]]:
    """Connect, reflect the table and wrap it in `Jobs`; disposes the engine after."""
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
        raise CommandError(missing_driver(safe, exc)) from None
    except NoSuchModuleError:
        raise CommandError(
            f"cannot use {safe}: SQLAlchemy knows no database driver named "
            f"{url.drivername!r}; check the spelling, or install the package that provides it"
        ) from None
    except ArgumentError as exc:
        raise CommandError(f"cannot use {safe}: {db_reason(exc, url.password)}") from None
    try:
        try:
            with engine.connect():
                pass
        except DBAPIError as exc:
            raise CommandError(
                f"cannot connect to {safe}: {db_reason(exc, url.password)}"
            ) from None
        table = _reflect(engine, args.table, safe)
        try:
            jobs = Jobs(engine, table)
        except TypeError as exc:
            raise CommandError(f"{exc} (table in {safe})") from None
        yield jobs, SQLAlchemyRows(engine, table)
    except SQLAlchemyError as exc:
        raise CommandError(f"database error on {safe}: {db_reason(exc, url.password)}") from None
    finally:
        engine.dispose()


# Python module of a database driver -> what to install for it.
_DRIVER_PACKAGES = {
    "psycopg": "pip install 'dbcancel[postgres]'",
    "pymysql": "pip install 'dbcancel[mysql]'",
    "psycopg2": "pip install psycopg2-binary, or use postgresql+psycopg:// with "
    "pip install 'dbcancel[postgres]'",
    "MySQLdb": "pip install mysqlclient, or use mysql+pymysql:// with "
    "pip install 'dbcancel[mysql]'",
    "pg8000": "pip install pg8000",
    "asyncpg": "pip install asyncpg",
    "mysql": "pip install mysql-connector-python",
    "mariadb": "pip install mariadb",
    "oracledb": "pip install oracledb",
    "pyodbc": "pip install pyodbc",
    "pymssql": "pip install pymssql",
}


def missing_driver(safe_url: str, exc: ImportError) -> str:
    """The message for a URL whose database driver is not installed: which Python
    module is missing and what to install (the dbcancel extra for psycopg and PyMySQL).

    `safe_url` is the URL with its password hidden.
    """
    module = (exc.name or "").split(".")[0]
    if not module:
        return f"cannot use {safe_url}: its database driver is missing ({exc})"
    fix = _DRIVER_PACKAGES.get(module, f"install the package that provides {module!r}")
    return f"cannot use {safe_url}: its database driver {module} is not installed; {fix}"


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


def parse_job_id(table: Table, text: str) -> Any:
    """`text` converted to the primary key's Python type (int for integer keys).

    Raises `ValueError` naming the table when it cannot be one of its ids.
    """
    return sqlalchemy_id(table, text)
