"""The three command lines side by side: ``python -m dbcancel``, ``flask dbcancel`` and
``manage.py dbcancel`` run the same scenarios on the same table, on SQLite, PostgreSQL and
MariaDB, and must print the same lines (but for the program's name), exit with the same
status and leave the same rows.

The table is the Django test app's: Django creates it, ``python -m dbcancel`` reflects it
from its URL, and a Flask app maps it with ``DBCancel(engine=..., model=<reflected Table>)``.
Each command line starts from the same rows, with fixed ids and timestamps.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connections
from flask import Flask
from sqlalchemy import Engine, MetaData, Table, create_engine
from sqlalchemy.engine import URL

from dbcancel import Status
from dbcancel.cli import main
from dbcancel.contrib.django.management.commands.dbcancel import Command
from dbcancel.contrib.flask import DBCancel

from .testapp.models import Analysis, Tracked

T0 = dt.datetime(2026, 1, 31, 12, 0, 0, tzinfo=dt.UTC)
BEAT = T0 + dt.timedelta(seconds=30)
END = T0 + dt.timedelta(seconds=90)
PENDING: dict[str, Any] = {}
RUNNING = {"status": Status.IN_PROGRESS, "started_at": T0, "heartbeat_at": BEAT}
COMPLETED = {**RUNNING, "status": Status.COMPLETED, "finished_at": END}
FAILED = {**COMPLETED, "status": Status.FAILED, "error": "ValueError: frame 12 is corrupt"}
CANCELLED = {
    **COMPLETED,
    "status": Status.CANCELLED,
    "cancel_requested_at": BEAT,
    "cancel_reason": "session deleted",
}
STOPPING = {**CANCELLED, "finished_at": None}  # cancelled, its worker not stopped yet
WORKER = "web-1:12345:ab12cd"
LONG_ERROR = "RuntimeError: " + "x" * 100
PROGS = ("dbcancel", "flask dbcancel", "manage.py dbcancel")


def sqlalchemy_url(alias: str) -> str:
    """The SQLAlchemy URL of the test database behind a Django alias."""
    entry = connections[alias].settings_dict
    if entry["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{entry['NAME']}"
    postgresql = entry["ENGINE"].endswith("postgresql")
    return URL.create(
        "postgresql+psycopg" if postgresql else "mysql+pymysql",
        username=entry["USER"] or None,
        password=entry["PASSWORD"] or None,
        host=entry["HOST"] or None,
        port=int(entry["PORT"]) if entry["PORT"] else None,
        database=entry["NAME"],
        query={} if postgresql else {"charset": "utf8mb4"},
    ).render_as_string(hide_password=False)


@dataclass
class Result:
    """What one command line did: exit status, stdout and stderr (program name as PROG),
    and the rows it left (id, status, cancel_reason, error, stopped)."""

    code: int
    out: str
    err: str
    rows: list[tuple[Any, ...]] = field(default_factory=list)


class CommandLines:
    """Runs one command on one job model through each of the three command lines."""

    def __init__(self, alias: str, model: Any, capsys: pytest.CaptureFixture[str]) -> None:
        self.alias = alias
        self.model = model
        self.table_name: str = model._meta.db_table
        self.capsys = capsys
        self.url = sqlalchemy_url(alias)
        self.engine: Engine = create_engine(self.url)
        table = Table(self.table_name, MetaData(), autoload_with=self.engine)
        self.app = Flask(__name__)
        DBCancel(self.app, engine=self.engine, model=table)
        self.runners: dict[str, Callable[..., tuple[int, str, str]]] = {
            "dbcancel": self.python_m,
            "flask dbcancel": self.flask,
            "manage.py dbcancel": self.manage_py,
        }

    def python_m(self, *args: str) -> tuple[int, str, str]:
        code = main([*args, "--url", self.url, "--table", self.table_name])
        out, err = self.capsys.readouterr()
        return code, out, err

    def flask(self, *args: str) -> tuple[int, str, str]:
        result = self.app.test_cli_runner().invoke(args=["dbcancel", *args], prog_name="flask")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    def manage_py(self, *args: str) -> tuple[int, str, str]:
        label = self.model._meta.label
        argv = ["manage.py", "dbcancel", *args, "--model", label, "--database", self.alias]
        try:
            Command().run_from_argv(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def rows(self) -> list[tuple[Any, ...]]:
        found = self.model._base_manager.using(self.alias).order_by("pk")
        return [
            (r.pk, Status(r.status), r.cancel_reason, r.error, r.finished_at is not None)
            for r in found
        ]

    def setup(self, rows: dict[int, dict[str, Any]]) -> None:
        """Replace every row of the table by ``rows`` (id -> field values)."""
        manager = self.model._base_manager.using(self.alias)
        manager.all().delete()
        for job_id, values in rows.items():
            manager.create(pk=job_id, **values)

    def run_everywhere(self, rows: dict[int, dict[str, Any]], *args: str) -> Result:
        """Run ``args`` from the same ``rows`` through each command line; check that they
        agree and return what they did."""
        results = {}
        for prog, runner in self.runners.items():
            self.setup(rows)
            code, out, err = runner(*args)
            results[prog] = Result(code, out, unprog(err, prog), self.rows())
        first = results["dbcancel"]
        for prog, result in results.items():
            assert result == first, f"{prog} differs from python -m dbcancel"
        return first


def unprog(text: str, prog: str) -> str:
    """``text`` with the program's name at the start of its lines replaced by PROG."""
    return "".join(
        "PROG" + line[len(prog) :] if line.startswith(f"{prog}: ") else line
        for line in text.splitlines(keepends=True)
    )


@pytest.fixture
def clis(alias: str, capsys: pytest.CaptureFixture[str]) -> Iterator[CommandLines]:
    """The three command lines on the test app's ``Analysis`` (no ``worker_id`` column)."""
    lines = CommandLines(alias, Analysis, capsys)
    yield lines
    lines.engine.dispose()


@pytest.fixture
def tracked(alias: str, capsys: pytest.CaptureFixture[str]) -> Iterator[CommandLines]:
    """The three command lines on ``Tracked``, whose table has a ``worker_id`` column."""
    lines = CommandLines(alias, Tracked, capsys)
    yield lines
    lines.engine.dispose()


# -- cancel -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "args", "code", "out", "after"),
    [
        pytest.param(
            PENDING,
            ["--reason", "ops said so"],
            0,
            "testapp_analysis 7: cancelled\n",
            (Status.CANCELLED, "ops said so", None, True),
            id="pending",
        ),
        pytest.param(
            RUNNING,
            [],
            0,
            "testapp_analysis 7: cancelled (it was in progress: its worker stops at its next "
            "checkpoint)\n",
            (Status.CANCELLED, None, None, False),
            id="running",
        ),
        pytest.param(
            CANCELLED,
            ["--reason", "again"],
            0,
            "testapp_analysis 7: already cancelled\n",
            (Status.CANCELLED, "session deleted", None, True),
            id="cancelled",
        ),
        pytest.param(
            COMPLETED,
            [],
            1,
            "testapp_analysis 7: not cancelled: it is completed\n",
            (Status.COMPLETED, None, None, True),
            id="completed",
        ),
        pytest.param(
            FAILED,
            [],
            1,
            "testapp_analysis 7: not cancelled: it is failed\n",
            (Status.FAILED, None, FAILED["error"], True),
            id="failed",
        ),
    ],
)
def test_cancel(clis, state, args, code, out, after):
    result = clis.run_everywhere({7: state}, "cancel", "7", *args)

    assert (result.code, result.out, result.err) == (code, out, "")
    assert result.rows == [(7, *after)]


def test_cancel_a_missing_job(clis):
    result = clis.run_everywhere({7: PENDING}, "cancel", "8")

    assert (result.code, result.out) == (2, "")
    assert result.err == "PROG: error: testapp_analysis 8 not found; nothing was changed\n"
    assert result.rows == [(7, Status.PENDING, None, None, False)]


@pytest.mark.parametrize("command", ["cancel", "status"])
def test_an_id_of_the_wrong_type(clis, command):
    result = clis.run_everywhere({7: PENDING}, command, "seven")

    assert (result.code, result.out) == (2, "")
    assert result.err == "PROG: error: testapp_analysis ids are integers; 'seven' is not one\n"
    assert result.rows == [(7, Status.PENDING, None, None, False)]


# -- status -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "lines"),
    [
        pytest.param(PENDING, [], id="pending"),
        pytest.param(
            RUNNING,
            ["  started:   2026-01-31T12:00:00Z", "  heartbeat: 2026-01-31T12:00:30Z"],
            id="running",
        ),
        pytest.param(
            COMPLETED,
            ["  started:   2026-01-31T12:00:00Z", "  finished:  2026-01-31T12:01:30Z"],
            id="completed",
        ),
        pytest.param(
            FAILED,
            [
                "  error:     ValueError: frame 12 is corrupt",
                "  started:   2026-01-31T12:00:00Z",
                "  finished:  2026-01-31T12:01:30Z",
            ],
            id="failed",
        ),
        pytest.param(
            CANCELLED,
            [
                "  reason:    session deleted",
                "  started:   2026-01-31T12:00:00Z",
                "  finished:  2026-01-31T12:01:30Z",
            ],
            id="cancelled",
        ),
        pytest.param(
            STOPPING,
            [
                "  reason:    session deleted",
                "  started:   2026-01-31T12:00:00Z",
                "  heartbeat: 2026-01-31T12:00:30Z",
            ],
            id="cancelled-not-stopped",
        ),
    ],
)
def test_status(clis, state, lines):
    result = clis.run_everywhere({7: state}, "status", "7")

    status = Status(state.get("status", Status.PENDING)).value
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines() == [f"testapp_analysis 7: {status}", *lines]


def test_status_of_a_multi_line_error(clis):
    result = clis.run_everywhere({7: {**FAILED, "error": "Traceback:\n  boom"}}, "status", "7")

    assert result.out.splitlines()[:3] == [
        "testapp_analysis 7: failed",
        "  error:     Traceback:",
        "               boom",
    ]


def test_read_only_commands_never_say_nothing_was_changed(clis):
    result = clis.run_everywhere({7: PENDING}, "status", "8")

    assert (result.code, result.out) == (2, "")
    assert result.err == "PROG: error: testapp_analysis 8 not found\n"
    assert result.rows == [(7, Status.PENDING, None, None, False)]


def test_status_shows_the_worker(tracked):
    result = tracked.run_everywhere({7: {**RUNNING, "worker_id": WORKER}}, "status", "7")

    assert result.out.splitlines() == [
        "testapp_tracked 7: in_progress",
        "  started:   2026-01-31T12:00:00Z",
        "  heartbeat: 2026-01-31T12:00:30Z",
        f"  worker:    {WORKER}",
    ]


# -- list -------------------------------------------------------------------------------

EVERY_STATE = {
    1: PENDING,
    2: RUNNING,
    3: COMPLETED,
    4: {**FAILED, "error": LONG_ERROR},
    5: {**CANCELLED, "cancel_reason": "session   deleted\nby user"},
    6: STOPPING,
}


def test_list_without_a_worker_column(clis):
    result = clis.run_everywhere(EVERY_STATE, "list", "--all")

    assert (result.code, result.err) == (0, "")
    cut = LONG_ERROR[:37] + "..."
    assert result.out.splitlines() == [
        "id  status       started               finished                   worker  reason/error",
        "--  -----------  --------------------  -------------------------  ------  "
        + "-" * len(cut),
        " 1  pending      -                     -                          -       -",
        " 2  in_progress  2026-01-31T12:00:00Z  beat 2026-01-31T12:00:30Z  -       -",
        " 3  completed    2026-01-31T12:00:00Z  2026-01-31T12:01:30Z       -       -",
        f" 4  failed       2026-01-31T12:00:00Z  2026-01-31T12:01:30Z       -       {cut}",
        " 5  cancelled    2026-01-31T12:00:00Z  2026-01-31T12:01:30Z       -       "
        "session deleted by user",
        " 6  cancelled    2026-01-31T12:00:00Z  beat 2026-01-31T12:00:30Z  -       session deleted",
    ]


def test_list_with_a_worker_column(tracked):
    rows = {1: PENDING, 12: {**RUNNING, "worker_id": WORKER}}

    result = tracked.run_everywhere(rows, "list")

    assert result.out.splitlines() == [
        "id  status       started               finished                   worker"
        "              reason/error",
        "--  -----------  --------------------  -------------------------  "
        "------------------  ------------",
        " 1  pending      -                     -                          -                   -",
        "12  in_progress  2026-01-31T12:00:00Z  beat 2026-01-31T12:00:30Z  " + WORKER + "  -",
    ]


@pytest.mark.parametrize(
    ("args", "ids"),
    [
        pytest.param([], [1, 2], id="default"),
        pytest.param(["--all"], [1, 2, 3, 4, 5, 6], id="all"),
        pytest.param(["--status", "cancelled"], [5, 6], id="cancelled"),
        pytest.param(["--status", "failed"], [4], id="failed"),
    ],
)
def test_list_chooses_by_status(clis, args, ids):
    result = clis.run_everywhere(EVERY_STATE, "list", *args)

    assert (result.code, result.err) == (0, "")
    assert [int(line.split()[0]) for line in result.out.splitlines()[2:]] == ids


@pytest.mark.parametrize(
    ("args", "what"),
    [
        pytest.param([], "pending or in_progress jobs", id="default"),
        pytest.param(["--all"], "jobs", id="all"),
        pytest.param(["--status", "failed"], "failed jobs", id="failed"),
    ],
)
def test_list_of_nothing(clis, args, what):
    rows = {3: COMPLETED} if not args else {}

    result = clis.run_everywhere(rows, "list", *args)

    assert (result.code, result.out, result.err) == (0, f"no {what} in testapp_analysis\n", "")


# -- reap -------------------------------------------------------------------------------


def test_reap(clis):
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(hours=1)
    rows = {
        1: {"status": Status.IN_PROGRESS, "started_at": old, "heartbeat_at": old},
        2: {**STOPPING, "started_at": old, "heartbeat_at": old},
        3: {"status": Status.IN_PROGRESS, "started_at": now, "heartbeat_at": now},
        4: PENDING,
    }

    result = clis.run_everywhere(rows, "reap", "--stale-after", "30")

    assert (result.code, result.out, result.err) == (
        0,
        "reaped 2 jobs of testapp_analysis (no heartbeat for 30s)\n",
        "",
    )
    assert result.rows == [
        (1, Status.FAILED, None, "worker lost", True),
        (2, Status.CANCELLED, "session deleted", None, True),
        (3, Status.IN_PROGRESS, None, None, False),
        (4, Status.PENDING, None, None, False),
    ]


# -- usage errors: each parser words them its own way, with the same exit status ----------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["reap"], "--stale-after", id="reap-without-stale-after"),
        pytest.param(
            ["reap", "--stale-after", "0"], "expected a number of seconds > 0, got 0", id="zero"
        ),
        pytest.param(["list", "--all", "--status", "failed"], "--all", id="all-and-status"),
        pytest.param(["list", "--status", "done"], "done", id="unknown-status"),
    ],
)
def test_usage_errors(clis, args, message):
    for prog, runner in clis.runners.items():
        clis.setup({7: RUNNING})
        code, out, err = runner(*args)
        assert (code, out) == (2, ""), prog
        assert message in err, prog
        assert clis.rows() == [(7, Status.IN_PROGRESS, None, None, False)]


def test_no_sqlalchemy_in_the_django_command_or_the_shared_commands():
    """The shared commands and the Django command import SQLAlchemy nowhere but in
    ``SQLAlchemyRows``, when it is built."""
    import ast
    import inspect

    import dbcancel._commands
    import dbcancel.contrib.django.management.commands.dbcancel as django_command

    for module in (dbcancel._commands, django_command):
        tree = ast.parse(inspect.getsource(module))
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "SQLAlchemyRows":
                allowed |= {id(n) for n in ast.walk(node)}
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "sqlalchemy" for n in names):
                assert id(node) in allowed, f"{module.__name__} line {node.lineno}"
