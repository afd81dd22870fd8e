"""Flask integration: ``DBCancel``, background jobs in the app context, ``flask dbcancel``.

::

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

    def analyze(cp, session_id):                     # runs in a thread, in the app context
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

Flask-SQLAlchemy's ``db.engine`` exists only once the app is set up, so each app's
:class:`dbcancel.Jobs` is built on first use and kept in ``app.extensions["dbcancel"]``
(a :class:`DBCancelState`). ``init_app`` also adds the ``flask dbcancel`` commands
(``list [--all|--status S]``, ``status ID``, ``cancel ID [--reason TEXT]``,
``reap --stale-after SECONDS``), which word their output and choose their exit statuses as
``python -m dbcancel`` does.

Importing this module needs Flask (``pip install 'dbcancel[flask]'``); Flask-SQLAlchemy
only when ``db=`` is used.
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

from sqlalchemy import Engine, Table, select
from sqlalchemy.exc import SQLAlchemyError

from dbcancel._sqla import resolve_engine, resolve_table
from dbcancel.checkpoint import Checkpoint
from dbcancel.cli import (
    EXIT_ERROR,
    EXIT_REFUSED,
    _positive_float,
    _reason,
    _text,
    _when,
    parse_job_id,
    reap_summary,
)
from dbcancel.demo import format_table
from dbcancel.errors import InvalidTransition, JobNotFound
from dbcancel.jobs import Jobs, check_options
from dbcancel.models import REQUIRED_COLUMNS, TERMINAL, Status

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["EXTENSION_KEY", "DBCancel", "DBCancelState", "cli"]

EXTENSION_KEY = "dbcancel"
"""The key of :class:`DBCancelState` in ``app.extensions``."""

_STARTABLE = frozenset({Status.PENDING, Status.CANCELLED})


class DBCancel:
    """The dbcancel extension for Flask: a :class:`dbcancel.Jobs` per app, background
    jobs in the app context, and the ``flask dbcancel`` commands.

    Pass ``db`` (a Flask-SQLAlchemy ``SQLAlchemy`` instance; its engine for the model's
    bind key is used) or ``engine`` (an Engine, or a sessionmaker bound to one), and
    ``model``, a mapped class with :class:`dbcancel.CancellableMixin`. ``interval``,
    ``clock``, ``watch`` and ``max_staleness`` go to :class:`dbcancel.Jobs`. With
    ``app``, ``init_app(app)`` is called at once and that app is used outside any app
    context; otherwise call ``init_app`` in the app factory, once per app.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        model: Any,
        engine: Any = None,
        interval: float = 0.5,
        clock: Callable[[], float] | None = None,
        watch: bool = False,
        max_staleness: float | None = None,
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
        """The engine given to the constructor, or None when ``db`` was given."""
        self.model = model
        """The job model."""
        self.table = _job_table(model)
        """The model's table."""
        interval, max_staleness = check_options(
            interval=interval, clock=clock, watch=watch, max_staleness=max_staleness
        )
        self.interval = interval
        """Seconds between two polls of a running job's row."""
        self.max_staleness = max_staleness
        """Seconds without a successful poll before jobs are cancelled locally, or None."""
        self.watch = watch
        """True for one shared watcher per process (see :class:`dbcancel.Jobs`)."""
        self.clock = clock
        """The clock given to :class:`dbcancel.Jobs`; None for :func:`time.monotonic`."""
        self._app = app
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        table = getattr(self, "table", None)
        source = "engine" if getattr(self, "db", None) is None else "db"
        return f"<DBCancel {getattr(table, 'name', '?')} via {source}>"

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app``: its state and the ``flask dbcancel`` commands.

        Raises RuntimeError when ``app`` already has a dbcancel extension.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"app {app.name!r} already has a dbcancel extension; one DBCancel per app "
                "(its model's table holds the jobs)"
            )
        app.extensions[EXTENSION_KEY] = DBCancelState(self, app)
        app.cli.add_command(cli)

    @property
    def jobs(self) -> Jobs:
        """The :class:`dbcancel.Jobs` of the current app (built on first use).

        Needs an app context, as in a request or a CLI command, unless an app was passed
        to the constructor: that one is used outside any context.
        """
        return self.state().jobs

    def state(self, app: Flask | None = None) -> DBCancelState:
        """The extension's state on ``app`` (default: the current app)."""
        if app is None:
            app = self._current_app()
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, DBCancelState) or state.extension is not self:
            raise RuntimeError(
                f"this DBCancel is not registered on app {app.name!r}: call "
                "ext.init_app(app) in the app factory"
            )
        return state

    def submit(
        self, job_id: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> threading.Thread:
        """Run ``fn(cp, *args, **kwargs)`` in a new daemon thread and return the thread.

        The thread (named ``dbcancel-job-<id>``) pushes an app context of the current app
        and enters ``jobs.run(job_id)``; ``cp`` is the job's :class:`dbcancel.Checkpoint`
        (``dbcancel.checkpoint()`` and ``dbcancel.current()`` work too). ``fn`` may be a
        coroutine function: its coroutine then runs with :func:`asyncio.run`. When ``fn``
        returns the job is completed; an exception marks it failed (its text is kept in
        the ``error`` column) and is logged with ``app.logger``; a cancel stops it at its
        next checkpoint. A job cancelled before the thread got to it never calls ``fn``.

        The id is checked here, in the caller's thread: a missing job raises
        :class:`dbcancel.JobNotFound`, and one that has already run
        :class:`dbcancel.InvalidTransition`, with no thread started. With Flask-SQLAlchemy
        the thread's ``db.session`` is removed (uncommitted work rolled back, its
        connection returned) when ``fn`` returns, before the job's status changes.
        The thread is a daemon: a worker still running when the interpreter exits is
        killed with its job left in progress.
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
        raise RuntimeError(
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
            raise RuntimeError(
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
                        if not cp.cancelled:
                            result = fn(cp, *args, **kwargs)
                            if asyncio.iscoroutine(result):
                                asyncio.run(result)
                    finally:
                        # Before run() exits: an uncommitted write of the worker's session
                        # must not hold locks the status UPDATE of the exit then waits for.
                        self._remove_session()
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
    """What :class:`DBCancel` keeps per app, in ``app.extensions["dbcancel"]``."""

    def __init__(self, extension: DBCancel, app: Flask) -> None:
        self.extension = extension
        """The :class:`DBCancel` that registered this state."""
        self.app = app
        """The app this state belongs to."""
        self._jobs: Jobs | None = None
        self._lock = threading.Lock()

    @property
    def jobs(self) -> Jobs:
        """The app's :class:`dbcancel.Jobs`, built on first use (needs the app's engine)."""
        jobs = self._jobs
        if jobs is None:
            with self._lock:
                if self._jobs is None:
                    ext = self.extension
                    self._jobs = Jobs(
                        ext._engine_for(self.app),
                        ext.model,
                        interval=ext.interval,
                        clock=ext.clock,
                        watch=ext.watch,
                        max_staleness=ext.max_staleness,
                    )
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


class _Failure(click.ClickException):
    """One line on stderr and exit status 2, as ``python -m dbcancel`` reports errors."""

    exit_code = EXIT_ERROR


cli = AppGroup(
    "dbcancel",
    help="Cancel, inspect, list and reap the jobs of this app's dbcancel table. Times are UTC.",
)
"""The ``flask dbcancel`` command group that ``DBCancel.init_app`` adds to ``app.cli``."""


def _state() -> DBCancelState:
    state = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, DBCancelState):
        raise _Failure(
            f"dbcancel is not set up on app {current_app.name!r}: call DBCancel.init_app(app)"
        )
    return state


def _job_id(table: Table, text: str) -> Any:
    """``ID`` converted to the primary key's Python type, as ``python -m dbcancel`` does."""
    try:
        return parse_job_id(table, text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None


def _seconds(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """``--stale-after`` as ``python -m dbcancel`` reads it: seconds, finite and > 0."""
    try:
        return _positive_float(value)
    except argparse.ArgumentTypeError as exc:
        raise click.BadParameter(str(exc)) from None


def _database_error(state: DBCancelState, exc: SQLAlchemyError) -> _Failure:
    url = state.engine.url
    safe = url.render_as_string(hide_password=True)
    return _Failure(f"database error on {safe}: {_reason(exc, url.password)}")


@cli.command("list")
@click.option("--all", "every", is_flag=True, help="List jobs in every status.")
@click.option(
    "--status",
    type=click.Choice([s.value for s in Status]),
    help="List jobs in this status only.",
)
def list_command(every: bool, status: str | None) -> None:
    """List jobs in id order (by default those pending or in progress)."""
    if every and status:
        raise click.UsageError("--all and --status exclude each other")
    state = _state()
    table = state.extension.table
    c = table.c
    pk = next(iter(table.primary_key.columns))
    stmt = select(pk, c.status, c.started_at, c.cancel_requested_at, c.cancel_reason)
    if status:
        stmt = stmt.where(c.status == status)
        what = f"{status} jobs"
    elif not every:
        stmt = stmt.where(c.status.not_in(sorted(s.value for s in TERMINAL)))
        what = "pending or in_progress jobs"
    else:
        what = "jobs"
    try:
        with state.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(pk)).all()
    except SQLAlchemyError as exc:
        raise _database_error(state, exc) from None
    if not rows:
        click.echo(f"no {what} in {table.name}")
        return
    click.echo(
        format_table(
            ["id", "status", "started_at", "cancel_requested_at", "reason"],
            [[str(r[0]), str(r[1]), _when(r[2]), _when(r[3]), _text(r[4])] for r in rows],
            right="0",
        )
    )


@cli.command("status")
@click.argument("job_id", metavar="ID")
def status_command(job_id: str) -> None:
    """Print a job's status: pending, in_progress, completed, failed or cancelled."""
    state = _state()
    key = _job_id(state.extension.table, job_id)
    try:
        status = state.jobs.status(key)
    except JobNotFound as exc:
        raise _Failure(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _database_error(state, exc) from None
    click.echo(status.value)


@cli.command("cancel")
@click.argument("job_id", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Stored in cancel_reason.")
def cancel_command(job_id: str, reason: str | None) -> None:
    """Cancel a pending or in-progress job; a running worker stops at its next checkpoint.

    Exit status 1 when the job had already completed or failed (nothing changed).
    """
    state = _state()
    table = state.extension.table
    key = _job_id(table, job_id)
    jobs = state.jobs
    label = f"{table.name} {key}"
    try:
        # Read first only to word the answer; cancel() itself decides, atomically.
        before = jobs.status(key)
        cancelled = jobs.cancel(key, reason=reason)
        after = before if cancelled else jobs.status(key)
    except JobNotFound as exc:
        raise _Failure(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _database_error(state, exc) from None
    if not cancelled:
        click.echo(f"{label}: not cancelled: it is {after.value}")
        raise click.exceptions.Exit(EXIT_REFUSED)
    if before is Status.CANCELLED:
        click.echo(f"{label}: already cancelled")
    elif before is Status.IN_PROGRESS:
        click.echo(
            f"{label}: cancelled (it was in progress: its worker stops at its next checkpoint)"
        )
    else:
        click.echo(f"{label}: cancelled")


@cli.command("reap")
@click.option(
    "--stale-after",
    required=True,
    callback=_seconds,
    metavar="SECONDS",
    help="Reap jobs with no heartbeat for this many seconds; make it several poll "
    "intervals, so that a slow poll does not look like a dead worker.",
)
def reap_command(stale_after: float) -> None:
    """Stop jobs whose worker died (no heartbeat for --stale-after seconds).

    In-progress jobs become failed, with the error 'worker lost'; cancelled jobs whose
    worker never stopped are marked stopped (finished_at), so that wait() and delete
    flows stop waiting for them. Heartbeats come from workers running with watch=True.
    """
    state = _state()
    try:  # --stale-after was checked by its callback: reap() has nothing left to refuse
        count = state.jobs.reap(stale_after=stale_after)
    except SQLAlchemyError as exc:
        raise _database_error(state, exc) from None
    click.echo(reap_summary(count, state.extension.table.name, stale_after))
