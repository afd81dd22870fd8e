"""Flask integration: `DBCancel`, background jobs in the app context, `flask dbcancel`.

```python
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from dbcancel.contrib.flask import DBCancel

db = SQLAlchemy(model_class=Base)
cancel = DBCancel(db=db, model=Analysis)        # or DBCancel(engine=engine, model=...)

def create_app():
    app = Flask(__name__)
    db.init_app(app)
    cancel.init_app(app)
    return app

def analyze(cp, job_id, session_id):             # runs in a thread, in the app context
    for path in files_of(session_id):
        cp()                                     # raises Cancelled once cancelled
        process(path)

@app.post("/analysis/<int:analysis_id>/start")
def start(analysis_id):
    cancel.submit(analysis_id, analyze, request.json["session_id"])
    return "", 202

@app.delete("/analysis/<int:analysis_id>")
def stop(analysis_id):
    cancel.jobs.cancel(analysis_id, where={"user_id": current_user_id()})
    cancel.jobs.wait(analysis_id, timeout=10)    # its worker has stopped
    ...
```

Flask-SQLAlchemy's `db.engine` exists only once the app is set up, so each app's
[`Jobs`][dbcancel.Jobs] is built on first use and kept in `app.extensions["dbcancel"]`
(a [`DBCancelState`][dbcancel.contrib.flask.DBCancelState]). `init_app` also adds the
`flask dbcancel` commands (`list [--all|--status S]`, `status ID`,
`cancel ID [--reason TEXT]`, `reap --stale-after SECONDS`), which print the same lines and
exit with the same statuses as `python -m dbcancel` and `manage.py dbcancel`.

Importing this module needs Flask (`pip install 'dbcancel[flask]'`); Flask-SQLAlchemy
only when `db=` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    import click
    from flask import Flask, current_app, has_app_context
    from flask.cli import AppGroup
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.contrib.flask needs Flask, which is not installed: pip install 'dbcancel[flask]'"
    ) from err

from sqlalchemy import Engine, Table

from dbcancel import _commands as commands
from dbcancel._commands import (
    ALL_HELP,
    CANCEL_HELP,
    CANCEL_SUMMARY,
    EVERY_HELP,
    LIST_HELP,
    LIST_SUMMARY,
    ONCE_HELP,
    REAP_HELP,
    REAP_SUMMARY,
    REASON_HELP,
    STALE_AFTER_HELP,
    STATUS_HELP,
    STATUS_OPTION_HELP,
    STATUS_SUMMARY,
    TOP_HELP,
    TOP_SUMMARY,
    WORKERS_HELP,
    WORKERS_SUMMARY,
    Outcome,
    SQLAlchemyRows,
    positive_seconds,
)
from dbcancel._liveness import DEFAULT_HEARTBEAT
from dbcancel._options import DEFAULT_INTERVAL, Options, OptionsView
from dbcancel._sqla import resolve_engine, resolve_table
from dbcancel.checkpoint import Checkpoint
from dbcancel.errors import Cancelled, InvalidTransition, JobNotFound, UsageError
from dbcancel.jobs import Jobs
from dbcancel.models import REQUIRED_COLUMNS, JobId, Status

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["EXTENSION_KEY", "DBCancel", "DBCancelState", "cli"]

EXTENSION_KEY = "dbcancel"
"""The key of [`DBCancelState`][dbcancel.contrib.flask.DBCancelState] in `app.extensions`."""

_STARTABLE = frozenset({Status.PENDING, Status.CANCELLED})


class DBCancel(OptionsView):
    """The dbcancel extension for Flask: a [`Jobs`][dbcancel.Jobs] per app, background
    jobs in the app context, and the `flask dbcancel` commands.

    Pass `db` (a Flask-SQLAlchemy `SQLAlchemy` instance; its engine for the model's
    bind key is used) or `engine` (an Engine, or a sessionmaker bound to one), and
    `model`, a mapped class with [`CancellableMixin`][dbcancel.CancellableMixin]. `interval`,
    `clock`, `watch`, `max_staleness`, `heartbeat`, `listen_url` and `push` go to
    [`Jobs`][dbcancel.Jobs], and read back as `Jobs` shows them (`watch` is the mode in
    effect). With `app`, `init_app(app)` is called at once and that app is used outside
    any app context; otherwise call `init_app` in the app factory, once per app.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        model: Any,
        engine: Any = None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] | None = None,
        watch: bool | None = None,
        max_staleness: float | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        listen_url: Any = None,
        push: str | None = None,
    ) -> None:
        if (db is None) == (engine is None):
            raise TypeError(
                "DBCancel needs exactly one of db= (a Flask-SQLAlchemy SQLAlchemy instance) "
                "and engine= (an Engine or a sessionmaker bound to one)"
            )
        # A property that needs an app context: look on the class, not the instance.
        if db is not None and not (hasattr(type(db), "engines") and hasattr(db, "session")):
            raise TypeError(
                f"db= must be a Flask-SQLAlchemy SQLAlchemy instance, got {db!r}; pass a "
                "plain Engine as engine= instead"
            )
        self.db = db
        """The Flask-SQLAlchemy instance, or None when an engine was given."""
        self.engine: Engine | None = None if engine is None else resolve_engine(engine)
        """The engine given to the constructor, or None when `db` was given."""
        self.model = model
        """The job model."""
        self.table = _job_table(model)
        """The model's table."""
        self._options = Options.checked(
            interval=interval,
            clock=clock,
            watch=watch,
            max_staleness=max_staleness,
            heartbeat=heartbeat,
            push=push,
            listen_url=listen_url,
        )
        self._app = app
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        table = getattr(self, "table", None)
        source = "engine" if getattr(self, "db", None) is None else "db"
        return f"<DBCancel {getattr(table, 'name', '?')} via {source}>"

    def init_app(self, app: Flask) -> None:
        """Register the extension on `app`: its state and the `flask dbcancel` commands.

        Raises [`UsageError`][dbcancel.UsageError] when `app` already has a dbcancel
        extension.
        """
        if EXTENSION_KEY in app.extensions:
            raise UsageError(
                f"app {app.name!r} already has a dbcancel extension; one DBCancel per app "
                "(its model's table holds the jobs)"
            )
        app.extensions[EXTENSION_KEY] = DBCancelState(self, app)
        app.cli.add_command(cli)

    @property
    def jobs(self) -> Jobs:
        """The [`Jobs`][dbcancel.Jobs] of the current app (built on first use).

        Needs an app context, as in a request or a CLI command, unless an app was passed
        to the constructor: that one is used outside any context.
        """
        return self.state().jobs

    def state(self, app: Flask | None = None) -> DBCancelState:
        """The extension's state on `app` (default: the current app)."""
        if app is None:
            app = self._current_app()
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, DBCancelState) or state.extension is not self:
            raise UsageError(
                f"this DBCancel is not registered on app {app.name!r}: call "
                "ext.init_app(app) in the app factory"
            )
        return state

    def submit(
        self, job_id: JobId, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> threading.Thread:
        """Run `fn(cp, job_id, *args, **kwargs)` in a new daemon thread and return the
        thread.

        The thread (named `dbcancel-job-<id>`) pushes an app context of the current app
        and enters `jobs.run(job_id)`; `cp` is the job's [`Checkpoint`][dbcancel.Checkpoint]
        (`dbcancel.checkpoint()` and `dbcancel.current()` work too), and the body gets
        the job id next, as the task-queue integrations' bodies do. `fn` may be a
        coroutine function: its coroutine then runs with `asyncio.run`. When `fn`
        returns the job is completed; an exception marks it failed (its text is kept in
        the `error` column) and is logged with `app.logger`; a cancel stops it at its
        next checkpoint. A job cancelled before the thread got to it never calls `fn`.

        The id is checked here, in the caller's thread: a missing job raises
        [`JobNotFound`][dbcancel.JobNotFound], and one that has already run
        [`InvalidTransition`][dbcancel.InvalidTransition], with no thread started. With
        Flask-SQLAlchemy the thread's `db.session` is removed (uncommitted work rolled back,
        its connection returned) when `fn` returns, before the job's status changes. The
        thread is a daemon: a worker still running when the interpreter exits is killed with
        its job left in progress.
        """
        app = self._current_app()
        jobs = self.state(app).jobs
        status = jobs.status(job_id)
        if status not in _STARTABLE:
            raise InvalidTransition(jobs.model_name, job_id, status.value, Status.IN_PROGRESS.value)
        thread = threading.Thread(
            target=self._work,
            args=(app, jobs, job_id, fn, args, kwargs),
            name=f"dbcancel-job-{job_id}",
            daemon=True,
        )
        thread.start()
        return thread

    # -- internals ------------------------------------------------------------------

    def _current_app(self) -> Flask:
        if has_app_context():
            app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
            return app
        if self._app is not None:
            return self._app
        raise UsageError(
            "DBCancel needs an application context here: use it inside a request or a "
            "`flask` command, or in `with app.app_context():`, or pass the app to "
            "DBCancel(app, ...)"
        )

    def _engine_for(self, app: Flask) -> Engine:
        if self.engine is not None:
            return self.engine
        assert self.db is not None
        key = self.table.info.get("bind_key")
        if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
            engines = self.db.engines
        else:
            with app.app_context():
                engines = self.db.engines
        if key not in engines:
            raise UsageError(
                f"Flask-SQLAlchemy has no engine for bind key {key!r} (the bind of "
                f"{self.table.name}) on app {app.name!r}; configure it in SQLALCHEMY_BINDS"
            )
        return engines[key]

    def _remove_session(self) -> None:
        if self.db is not None:
            self.db.session.remove()

    def _work(
        self,
        app: Flask,
        jobs: Jobs,
        job_id: Any,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        with app.app_context():
            cp: Checkpoint | None = None
            try:
                with jobs.run(job_id) as cp:
                    try:
                        result = fn(cp, job_id, *args, **kwargs)
                        if asyncio.iscoroutine(result):
                            asyncio.run(result)
                    finally:
                        # Before run() exits: an uncommitted write of the worker's session
                        # must not hold locks the status UPDATE of the exit then waits for.
                        self._remove_session()
            except Cancelled as exc:
                if exc.job_id != job_id:
                    raise
                # Cancelled before this thread got to it: fn never ran.
                app.logger.info(
                    "dbcancel: %s %r was cancelled before its worker started (%s)",
                    jobs.model_name,
                    job_id,
                    exc.reason,
                )
            except JobNotFound:
                if cp is not None:
                    app.logger.exception("dbcancel: %s %r failed", jobs.model_name, job_id)
                else:
                    # Cancelled and deleted before this thread got to it: a normal race.
                    app.logger.info(
                        "dbcancel: %s %r was deleted before its worker started",
                        jobs.model_name,
                        job_id,
                    )
            except Exception:
                what = "failed" if cp is not None else "could not start"
                app.logger.exception("dbcancel: %s %r %s", jobs.model_name, job_id, what)
            else:
                assert cp is not None
                if cp.cancelled:
                    app.logger.info(
                        "dbcancel: %s %r cancelled (%s)", jobs.model_name, job_id, cp.reason
                    )
            finally:
                self._remove_session()


class DBCancelState:
    """What [`DBCancel`][dbcancel.contrib.flask.DBCancel] keeps per app, in
    `app.extensions["dbcancel"]`."""

    def __init__(self, extension: DBCancel, app: Flask) -> None:
        self.extension = extension
        """The [`DBCancel`][dbcancel.contrib.flask.DBCancel] that registered this state."""
        self.app = app
        """The app this state belongs to."""
        self._jobs: Jobs | None = None
        self._lock = threading.Lock()

    @property
    def jobs(self) -> Jobs:
        """The app's [`Jobs`][dbcancel.Jobs], built on first use (needs the app's engine)."""
        jobs = self._jobs
        if jobs is None:
            with self._lock:
                if self._jobs is None:
                    ext = self.extension
                    self._jobs = Jobs(ext._engine_for(self.app), ext.model, **ext._options.kwargs())
                jobs = self._jobs
        return jobs

    @property
    def engine(self) -> Engine:
        """The engine the app's jobs live in."""
        return self.extension._engine_for(self.app)


def _job_table(model: Any) -> Table:
    table, name = resolve_table(model)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.c]
    if missing:
        raise TypeError(
            f"{name} lacks the column(s) {', '.join(missing)} that dbcancel needs; add "
            "CancellableMixin to the model (and its columns to the table)"
        )
    return table


# -- flask dbcancel ---------------------------------------------------------------------


cli = AppGroup(
    "dbcancel",
    help="Cancel, inspect, list and reap the jobs of this app's dbcancel table. Times are "
    "UTC. Exit status: 0 success, 1 cancel refused (the job had already completed or "
    "failed), 2 usage error, unknown job or database error, 130 interrupted.",
)
"""The `flask dbcancel` command group that `DBCancel.init_app` adds to `app.cli`.

Its commands word their output and choose their exit statuses as `python -m dbcancel`
and `manage.py dbcancel` do: all three run `dbcancel._commands`.
"""


def _run(command: Callable[[Jobs, SQLAlchemyRows], Outcome]) -> None:
    """Run a shared command on the current app's table, print it, exit with its status."""
    ctx = click.get_current_context()
    prog = ctx.parent.command_path if ctx.parent is not None else ctx.command_path
    state = current_app.extensions.get(EXTENSION_KEY)
    try:
        if isinstance(state, DBCancelState):
            outcome = command(state.jobs, SQLAlchemyRows(state.engine, state.extension.table))
        else:
            outcome = Outcome(
                commands.EXIT_ERROR,
                err=f"error: dbcancel is not set up on app {current_app.name!r}: call "
                "DBCancel.init_app(app)",
            )
    except KeyboardInterrupt:
        outcome = commands.interrupted()
    status = commands.emit(
        outcome, prog, stdout=click.echo, stderr=lambda line: click.echo(line, err=True)
    )
    if status:
        raise click.exceptions.Exit(status)


def _seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """`--stale-after` as `python -m dbcancel` reads it: seconds, finite and > 0."""
    if value is None:
        return None
    try:
        return positive_seconds(value)
    except argparse.ArgumentTypeError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("list", short_help=LIST_SUMMARY, help=LIST_HELP)
@click.option("--all", "every", is_flag=True, help=ALL_HELP)
@click.option(
    "--status", type=click.Choice([s.value for s in Status]), metavar="S", help=STATUS_OPTION_HELP
)
def list_command(every: bool, status: str | None) -> None:
    """`flask dbcancel list [--all | --status S]`."""
    if every and status:
        raise click.UsageError("argument --status: not allowed with argument --all")
    _run(lambda jobs, rows: commands.list_jobs(rows, every=every, status=status))


@cli.command("status", short_help=STATUS_SUMMARY, help=STATUS_HELP)
@click.argument("job_id", metavar="ID")
def status_command(job_id: str) -> None:
    """`flask dbcancel status ID`."""
    _run(lambda jobs, rows: commands.status(jobs, rows, job_id))


@cli.command("cancel", short_help=CANCEL_SUMMARY, help=CANCEL_HELP)
@click.argument("job_id", metavar="ID")
@click.option("--reason", metavar="TEXT", help=REASON_HELP)
def cancel_command(job_id: str, reason: str | None) -> None:
    """`flask dbcancel cancel ID [--reason TEXT]`."""
    _run(lambda jobs, rows: commands.cancel(jobs, rows, job_id, reason))


@cli.command("reap", short_help=REAP_SUMMARY, help=REAP_HELP)
@click.option(
    "--stale-after",
    required=True,
    callback=_seconds,
    metavar="SECONDS",
    help=STALE_AFTER_HELP,
)
def reap_command(stale_after: float) -> None:
    """`flask dbcancel reap --stale-after SECONDS`."""
    # --stale-after was checked by its callback: reap() has nothing left to refuse.
    _run(lambda jobs, rows: commands.reap(jobs, rows, stale_after))


@cli.command("workers", short_help=WORKERS_SUMMARY, help=WORKERS_HELP)
def workers_command() -> None:
    """`flask dbcancel workers`."""
    _run(lambda jobs, rows: commands.workers(rows))


@cli.command("top", short_help=TOP_SUMMARY, help=TOP_HELP)
@click.option("--every", default="2", callback=_seconds, metavar="S", help=EVERY_HELP)
@click.option("--once", is_flag=True, help=ONCE_HELP)
def top_command(every: float, once: bool) -> None:
    """`flask dbcancel top [--every S] [--once]`."""
    _run(
        lambda jobs, rows: commands.top(
            rows, every=every, once=once, show=lambda text: click.echo(text + "\n")
        )
    )
