"""The app dbcancel was written for: upload videos into a session, analyse them, delete them.

A JSON API behind JWT (flask-jwt-extended; ``POST /login`` issues a token for a username,
there are no passwords: it is a demo):

* ``POST /sessions`` creates a session; ``POST /sessions/<id>/files`` uploads files into it
  (multipart, field ``file``, repeatable); ``GET /sessions/<id>`` lists them.
* ``POST /sessions/<id>/analysis`` starts an analysis in a background thread of this
  process, or on a Celery worker (``ANALYSIS_RUNNER=celery``, see ``celery_worker.py``):
  every file of the session is streamed, frame by frame, to the WebSocket analysis server
  (``examples/analysis_server.py``) through :class:`dbcancel.media.MediaAnalysisService`.
  ``GET /analysis/<id>`` shows its status and results.
* ``POST /video/delete`` with ``{"session_id": ...}`` deletes a session: it cancels the
  session's running analyses first, waits (at most ``STOP_TIMEOUT`` seconds) until their
  workers have stopped, and only then deletes the files and rows. ``DELETE /analysis/<id>``
  does the same for one analysis. Another user's session or analysis is a 404, and nothing
  is cancelled or deleted.

Run it with ``python examples/flask_app/run.py`` (see README.md next to this file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
from blinker import Namespace
from flask import Flask, abort, current_app, jsonify, request
from flask.cli import with_appcontext
from flask.typing import ResponseReturnValue
from flask_jwt_extended import JWTManager, create_access_token, get_jwt_identity, jwt_required
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import JSON, BigInteger, ForeignKey, MetaData, String, delete, event, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.exceptions import HTTPException
from werkzeug.utils import secure_filename

from dbcancel import CancellableMixin, Checkpoint, JobNotFound
from dbcancel.contrib.flask import DBCancel
from dbcancel.media import MediaAnalysisService

log = logging.getLogger("flask_app")

# -- models -------------------------------------------------------------------------------


class Base(DeclarativeBase):
    # Named constraints: Alembic can then drop and recreate them (SQLite batch mode needs
    # names), and the migrations in migrations/ spell the same names.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


db = SQLAlchemy(model_class=Base)


def _new_session_id() -> str:
    return uuid.uuid4().hex


class Session(db.Model):
    """An upload session of one user; its files live in ``UPLOAD_FOLDER/<id>/``."""

    __tablename__ = "sessions"

    # Random, so that ids cannot be guessed; also the name of the session's folder.
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_session_id)
    user_id: Mapped[str] = mapped_column(String(64), index=True)


class UploadedFile(db.Model):
    """One uploaded file; ``path`` is relative to ``UPLOAD_FOLDER``."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(String(32), ForeignKey("sessions.id"), index=True)
    path: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)


class Analysis(CancellableMixin, db.Model):
    """The analysis of a session's files: a cancellable job (status, cancel_reason, ...)."""

    __tablename__ = "analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(32), ForeignKey("sessions.id"), index=True)
    results: Mapped[Any] = mapped_column(JSON, nullable=True)


analyses = DBCancel(db=db, model=Analysis)
"""Runs and cancels analyses: ``analyses.submit(...)``, ``analyses.jobs.cancel(...)``."""

# Instrumentation points (blinker signals, as Flask's own): the tests use them to check
# that a worker never touches a file once its deletion has begun.
_signals = Namespace()
file_opened = _signals.signal("file-opened")
"""Sent by the analysis worker right after it opened an uploaded file (``path=``)."""
deletion_started = _signals.signal("deletion-started")
"""Sent just before a deletion removes anything (``session_id=`` or ``analysis_id=``)."""
analysis_stopped = _signals.signal("analysis-stopped")
"""Sent by the analysis worker when :func:`analyze_session` leaves, however it ends
(``analysis_id=``): after its last file access, before its job's status is written."""

ANALYZE_TASK = "flask_app.analyze_session"
"""The name of the Celery task that runs :func:`analyze_session` (``celery_worker.py``)."""
CELERY_KEY = "flask_app.celery"
"""The key of the Celery app that sends analyses, in ``app.extensions`` (celery mode)."""
RUNNERS = ("thread", "celery")
"""The values of ``ANALYSIS_RUNNER``: where analyses run."""


# -- the background job -------------------------------------------------------------------


def frames_of(stream: IO[bytes], frame_size: int) -> Iterator[bytes]:
    """The file's bytes in frames of ``frame_size`` bytes (a stand-in for a video decoder)."""
    while frame := stream.read(frame_size):
        yield frame


def analyze_session(cp: Checkpoint, analysis_id: int, *, view: str) -> None:
    """Stream every file of the analysis's session to the analysis server; store the results.

    Runs inside the app context and inside ``jobs.run(analysis_id)``: in a thread started
    by ``analyses.submit()``, or in the Celery task of ``celery_worker.py``. ``Cancelled``,
    raised by ``cp()`` before each file or by ``analyze()`` between and during frames,
    ends the job as ``cancelled``.
    """
    log.info("analysis %s started (view %s)", cp.job_id, view)
    # Runs where the cancel is seen: the canceller's thread here, the runtime thread in
    # another process. The worker stops at its next checkpoint.
    cp.on_cancel(lambda: log.info("analysis %s cancelled: %s", cp.job_id, cp.reason))
    try:
        _analyze_files(cp, view=view)
        log.info("analysis %s completed", cp.job_id)
    finally:
        analysis_stopped.send(current_app._get_current_object(), analysis_id=analysis_id)


def _analyze_files(cp: Checkpoint, *, view: str) -> None:
    config = current_app.config
    session_id = db.session.execute(
        select(Analysis.session_id).where(Analysis.id == cp.job_id)
    ).scalar_one()
    files = db.session.execute(
        select(UploadedFile.id, UploadedFile.path)
        .where(UploadedFile.session_id == session_id)
        .order_by(UploadedFile.id)
    ).all()
    # End the read transaction now: an analysis takes minutes, and an open transaction
    # would pin an old snapshot (MariaDB) or sit "idle in transaction" (PostgreSQL).
    db.session.close()

    service = MediaAnalysisService(
        config["ANALYSIS_SERVER_URI"],
        token=config["ANALYSIS_SERVER_TOKEN"],
        receive_timeout=config["ANALYSIS_RECEIVE_TIMEOUT"],
    )
    folder = Path(config["UPLOAD_FOLDER"])
    results = []
    for file_id, path in files:
        cp()  # a cancelled analysis opens no further file
        with (folder / path).open("rb") as stream:
            file_opened.send(current_app._get_current_object(), path=folder / path)
            frames = frames_of(stream, config["FRAME_SIZE"])
            per_frame = asyncio.run(service.analyze(frames, view=view, checkpoint=cp))
        results.append({"file_id": file_id, "frames": per_frame})

    # Results and completion commit together; if the analysis was cancelled meanwhile,
    # complete() raises Cancelled and the results roll back.
    with db.session.begin():
        db.session.execute(update(Analysis).where(Analysis.id == cp.job_id).values(results=results))
        cp.complete(db.session)


# -- helpers of the views -----------------------------------------------------------------


def _user() -> str:
    return str(get_jwt_identity())


def _json_object(required: str | None = None) -> dict[str, Any]:
    """The request's JSON object; 400 naming ``required`` when it is not there."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        wanted = f" with a {required!r} field" if required else ""
        abort(400, f"expected a JSON object{wanted} (Content-Type: application/json)")
    if required is not None:
        if required not in body:
            abort(400, f"missing field {required!r}")
        if not isinstance(body[required], str) or not body[required]:
            abort(400, f"field {required!r} must be a non-empty string")
    return body


def _lock_session(session_id: str) -> None:
    """Lock the user's session row for the current transaction; 404 when it is not theirs.

    Uploads, analysis starts and deletions of one session take this lock first, so they
    run one after the other. An UPDATE that changes nothing: it locks the row on PostgreSQL
    and MariaDB, and takes the write lock on SQLite, which ignores SELECT ... FOR UPDATE.
    Its row count is the rows matched (SQLAlchemy asks MySQL/MariaDB for found rows).
    """
    locked = db.session.execute(
        update(Session)
        .where(Session.id == session_id, Session.user_id == _user())
        .values(user_id=Session.user_id)
    )
    if locked.rowcount != 1:
        abort(404, f"no session {session_id!r}")


def _folder(session_id: str) -> Path:
    return Path(current_app.config["UPLOAD_FOLDER"]) / session_id


def _trash() -> Path:
    return Path(current_app.config["UPLOAD_FOLDER"]) / ".trash"


def _analysis_json(analysis: Analysis) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": analysis.id,
        "session_id": analysis.session_id,
        "status": analysis.status.value,
        "results": analysis.results,
        "error": analysis.error,
        "cancel_reason": analysis.cancel_reason,
        "started_at": iso(analysis.started_at),
        "finished_at": iso(analysis.finished_at),
    }


def _stop_timeout_response(what: str) -> ResponseReturnValue:
    timeout = current_app.config["STOP_TIMEOUT"]
    message = (
        f"{what} is cancelled but its worker has not stopped within {timeout} s; "
        "nothing was deleted, try again"
    )
    return jsonify(error=message), 409


# -- views --------------------------------------------------------------------------------


def login() -> ResponseReturnValue:
    """A token for ``{"username": ...}``. No password: this is a demo."""
    username = _json_object("username")["username"]
    return {"access_token": create_access_token(identity=username)}


@jwt_required()
def create_session() -> ResponseReturnValue:
    with db.session.begin():
        session = Session(user_id=_user())
        db.session.add(session)
    return {"id": session.id, "files": []}, 201


@jwt_required()
def show_session(session_id: str) -> ResponseReturnValue:
    session = db.session.scalars(
        select(Session).where(Session.id == session_id, Session.user_id == _user())
    ).first()
    if session is None:
        abort(404, f"no session {session_id!r}")
    files = db.session.scalars(
        select(UploadedFile).where(UploadedFile.session_id == session_id).order_by(UploadedFile.id)
    )
    listed = [{"id": f.id, "path": f.path, "size": f.size} for f in files]
    ids = db.session.scalars(
        select(Analysis.id).where(Analysis.session_id == session_id).order_by(Analysis.id)
    ).all()
    return {"id": session_id, "files": listed, "analyses": ids}


@jwt_required()
def upload_files(session_id: str) -> ResponseReturnValue:
    """Save the uploaded files into the session's folder, then record them.

    File first, row second: if the transaction fails the saved files are removed again, so
    a row never points at a missing file.
    """
    uploads = request.files.getlist("file")
    if not uploads:
        abort(400, "missing field 'file' (multipart/form-data, one or more files)")
    folder = _folder(session_id)
    saved: list[Path] = []
    rows: list[UploadedFile] = []
    try:
        with db.session.begin():
            _lock_session(session_id)  # 404 before anything is written
            folder.mkdir(parents=True, exist_ok=True)
            for upload in uploads:
                name = secure_filename(upload.filename or "") or "upload"
                target = folder / f"{uuid.uuid4().hex[:12]}-{name}"
                upload.save(target)
                saved.append(target)
                rows.append(
                    UploadedFile(
                        session_id=session_id,
                        path=target.relative_to(folder.parent).as_posix(),
                        size=target.stat().st_size,
                    )
                )
            db.session.add_all(rows)
            db.session.flush()
            added = [{"id": f.id, "path": f.path, "size": f.size} for f in rows]
    except BaseException:
        for target in saved:
            target.unlink(missing_ok=True)
        raise
    return {"session_id": session_id, "files": added}, 201


@jwt_required()
def start_analysis(session_id: str) -> ResponseReturnValue:
    """Create an analysis of the session and start it; ``{"view": ...}`` is optional."""
    body = _json_object() if request.content_length else {}
    view = body.get("view", current_app.config["ANALYSIS_VIEW"])
    if not isinstance(view, str):
        abort(400, "field 'view' must be a string")
    with db.session.begin():
        _lock_session(session_id)
        analysis = Analysis(user_id=_user(), session_id=session_id)
        db.session.add(analysis)
        db.session.flush()
        analysis_id = analysis.id
    # Started once the row is committed: the worker's first query must find it.
    if current_app.config["ANALYSIS_RUNNER"] == "celery":
        _send_to_celery(analysis_id, view)
    else:
        analyses.submit(analysis_id, analyze_session, view=view)
    return {"id": analysis_id, "session_id": session_id, "status": "pending"}, 202


def _send_to_celery(analysis_id: int, view: str) -> None:
    """Queue the analysis for a Celery worker; 503 (and the job cancelled) if it cannot."""
    from kombu.utils.url import maybe_sanitize_url

    config = current_app.config
    try:
        current_app.extensions[CELERY_KEY].send_task(
            ANALYZE_TASK, args=[analysis_id, view], queue=config["CELERY_QUEUE"]
        )
    except Exception:
        log.exception("queueing analysis %s failed", analysis_id)
        # No worker will ever run it: cancel the row rather than leave it pending forever.
        analyses.jobs.cancel(analysis_id, reason="could not be queued")
        abort(
            503,
            f"analysis {analysis_id} could not be queued: the Celery broker "
            f"{maybe_sanitize_url(config['CELERY_BROKER_URL'])} did not accept it; the analysis "
            "is cancelled, start a new one once the broker is up",
        )


def make_celery(config: Any) -> Any:
    """The Celery app of celery mode, for both sides: the web app sends with it
    (:data:`ANALYZE_TASK` on ``CELERY_QUEUE``), ``celery_worker.py`` declares the task on it.

    Broker ``CELERY_BROKER_URL``; no result backend: the job's row is the result.
    """
    from celery import Celery

    celery = Celery("flask_app", broker=config["CELERY_BROKER_URL"])
    celery.conf.update(
        broker_connection_retry_on_startup=True,
        task_default_queue=config["CELERY_QUEUE"],
        task_ignore_result=True,
        worker_prefetch_multiplier=1,  # an analysis is long: no worker hoards the queue
    )
    return celery


@jwt_required()
def show_analysis(analysis_id: int) -> ResponseReturnValue:
    analysis = db.session.scalars(
        select(Analysis).where(Analysis.id == analysis_id, Analysis.user_id == _user())
    ).first()
    if analysis is None:
        abort(404, f"no analysis {analysis_id}")
    return _analysis_json(analysis)


@jwt_required()
def delete_analysis(analysis_id: int) -> ResponseReturnValue:
    """Cancel the analysis, wait until its worker has stopped, then delete its row."""
    user, jobs = _user(), analyses.jobs
    try:
        # Ownership is part of the cancel's one conditional UPDATE: someone else's
        # analysis is a 404, and nothing changes.
        jobs.cancel(analysis_id, reason="deleted by its owner", where={"user_id": user})
        log.info("analysis %s cancel requested by %s; waiting for it to stop", analysis_id, user)
        final = jobs.wait(analysis_id, timeout=current_app.config["STOP_TIMEOUT"])
    except JobNotFound:
        abort(404, f"no analysis {analysis_id}")
    except TimeoutError:
        return _stop_timeout_response(f"analysis {analysis_id}")
    with db.session.begin():
        deletion_started.send(current_app._get_current_object(), analysis_id=analysis_id)
        db.session.execute(
            delete(Analysis).where(Analysis.id == analysis_id, Analysis.user_id == user)
        )
    log.info("analysis %s stopped (%s); deleted", analysis_id, final.value)
    return {"deleted": analysis_id, "status": final.value}


@jwt_required()
def delete_video() -> ResponseReturnValue:
    """Delete a session: cancel its analyses, wait for their workers, then files and rows.

    The files are moved into ``UPLOAD_FOLDER/.trash/`` (one rename of the session's
    folder) inside the transaction that deletes the rows, after the DELETEs have run and
    before the commit. If the commit fails, the folder is moved back; once it succeeded,
    the trash is emptied. So no row ever points at a deleted file, and no file outlives
    its row except in the trash, which :func:`recover_uploads` sorts out after a crash.
    """
    session_id = _json_object("session_id")["session_id"]
    user, jobs = _user(), analyses.jobs
    owned = db.session.scalar(
        select(Session.id).where(Session.id == session_id, Session.user_id == user)
    )
    if owned is None:
        abort(404, f"no session {session_id!r}")
    cancelled = jobs.cancel_where(user_id=user, session_id=session_id)
    log.info(
        "session %s: delete requested by %s, %d analysis(es) cancelled; waiting for them",
        session_id,
        user,
        cancelled,
    )
    running = db.session.scalars(
        select(Analysis.id).where(Analysis.session_id == session_id, Analysis.finished_at.is_(None))
    ).all()
    # No transaction (nor connection) held while waiting for the workers.
    db.session.close()
    # One budget for all: the session's workers were all cancelled at once.
    deadline = time.monotonic() + current_app.config["STOP_TIMEOUT"]
    for analysis_id in running:
        try:
            jobs.wait(analysis_id, timeout=max(0.0, deadline - time.monotonic()))
        except JobNotFound:
            continue  # deleted meanwhile by a DELETE /analysis/<id>
        except TimeoutError:
            return _stop_timeout_response(f"analysis {analysis_id} of session {session_id!r}")

    trashed: Path | None = None
    try:
        with db.session.begin():
            _lock_session(session_id)  # 404 if a concurrent request deleted it meanwhile
            started = db.session.scalars(
                select(Analysis.id).where(
                    Analysis.session_id == session_id, Analysis.finished_at.is_(None)
                )
            ).all()
            if started:
                abort(
                    409,
                    f"analysis {started[0]} of session {session_id!r} started "
                    "during the deletion; nothing was deleted, try again",
                )
            deletion_started.send(current_app._get_current_object(), session_id=session_id)
            final = db.session.execute(
                select(Analysis.id, Analysis.status)
                .where(Analysis.session_id == session_id)
                .order_by(Analysis.id)
            ).all()
            db.session.execute(delete(Analysis).where(Analysis.session_id == session_id))
            files = db.session.execute(
                delete(UploadedFile).where(UploadedFile.session_id == session_id)
            ).rowcount
            db.session.execute(delete(Session).where(Session.id == session_id))
            trashed = _move_to_trash(session_id)
    except HTTPException:
        _restore(trashed, session_id)
        raise
    except (OSError, SQLAlchemyError):
        _restore(trashed, session_id)
        log.exception("deleting session %s failed", session_id)
        abort(500, f"deleting session {session_id!r} failed; nothing was deleted")
    except BaseException:
        _restore(trashed, session_id)
        raise
    if trashed is not None:
        # Committed: the rows are gone, the files may go. A failure here leaves only trash.
        shutil.rmtree(trashed, ignore_errors=True)
    stopped = ", ".join(f"{id_} {status.value}" for id_, status in final) or "none"
    log.info("session %s deleted; its analyses stopped first: %s", session_id, stopped)
    return {
        "deleted": session_id,
        "files": files,
        "analyses": [{"id": id_, "status": status.value} for id_, status in final],
    }


def _move_to_trash(session_id: str) -> Path | None:
    """Move the session's folder into the trash in one rename; None when it has none."""
    folder = _folder(session_id)
    if not folder.exists():
        return None
    trash = _trash()
    trash.mkdir(exist_ok=True)
    target = trash / f"{session_id}.{uuid.uuid4().hex[:8]}"
    folder.rename(target)
    return target


def _restore(trashed: Path | None, session_id: str) -> None:
    if trashed is not None:
        trashed.rename(_folder(session_id))


def recover_uploads() -> tuple[int, int]:
    """Finish or undo deletions a crash interrupted; return (restored, purged).

    A folder in the trash whose session row still exists was moved by a deletion whose
    transaction never committed: it goes back. The others belong to committed deletions:
    they are removed. Run it at startup, before requests are served (``run.py`` does;
    ``flask recover-uploads`` too), never next to a deletion in progress.
    """
    trash = _trash()
    restored = purged = 0
    for entry in sorted(trash.iterdir()) if trash.is_dir() else ():
        session_id = entry.name.partition(".")[0]
        folder = _folder(session_id)
        if db.session.get(Session, session_id) is not None and not folder.exists():
            entry.rename(folder)
            restored += 1
        else:
            shutil.rmtree(entry)
            purged += 1
    db.session.close()
    return restored, purged


@click.command("recover-uploads")
@with_appcontext
def recover_uploads_command() -> None:
    """Restore or purge the upload folders left in the trash by an interrupted deletion."""
    restored, purged = recover_uploads()
    click.echo(f"restored {restored}, purged {purged}")


def _json_error(err: HTTPException) -> ResponseReturnValue:
    return jsonify(error=err.description), err.code or 500


# -- the app factory ----------------------------------------------------------------------


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite enforces foreign keys only when asked, per connection. WAL lets the workers'
    # polls read while a request writes.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app. ``config`` overrides the defaults, which read these variables:

    ``DATABASE_URL`` (default: SQLite in the instance folder), ``UPLOAD_FOLDER`` (default:
    ``uploads`` in the instance folder), ``JWT_SECRET_KEY`` (default: a random key per
    process), ``ANALYSIS_SERVER_URI`` (default ``ws://127.0.0.1:8765``)
    and ``ANALYSIS_SERVER_TOKEN``; ``ANALYSIS_RUNNER`` (``thread``, the default, or
    ``celery``), and in celery mode ``CELERY_BROKER_URL`` (default: RabbitMQ on loopback,
    guest/guest) and ``CELERY_QUEUE`` (default ``analyses``). Create the tables with the
    Alembic chain in ``migrations/`` (``run.py`` does) or with ``db.create_all()``.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL", "sqlite:///flask_app.db"),
        JWT_SECRET_KEY=os.environ.get("JWT_SECRET_KEY") or secrets.token_hex(32),
        UPLOAD_FOLDER=os.environ.get("UPLOAD_FOLDER") or os.path.join(app.instance_path, "uploads"),
        MAX_CONTENT_LENGTH=1024 * 1024 * 1024,
        ANALYSIS_SERVER_URI=os.environ.get("ANALYSIS_SERVER_URI", "ws://127.0.0.1:8765"),
        ANALYSIS_SERVER_TOKEN=os.environ.get("ANALYSIS_SERVER_TOKEN"),
        ANALYSIS_RECEIVE_TIMEOUT=30.0,
        ANALYSIS_VIEW="front",
        FRAME_SIZE=64 * 1024,  # bytes per frame sent to the analysis server
        STOP_TIMEOUT=10.0,  # seconds a deletion waits for the workers to stop
        ANALYSIS_RUNNER=os.environ.get("ANALYSIS_RUNNER", "thread"),
        CELERY_BROKER_URL=os.environ.get(
            "CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"
        ),
        CELERY_QUEUE=os.environ.get("CELERY_QUEUE", "analyses"),
    )
    app.config.update(config or {})
    if app.config["ANALYSIS_RUNNER"] not in RUNNERS:
        raise ValueError(
            f"ANALYSIS_RUNNER must be one of {', '.join(RUNNERS)}, got "
            f"{app.config['ANALYSIS_RUNNER']!r}: thread runs analyses in this process, "
            "celery on the workers of celery_worker.py"
        )
    if app.config["ANALYSIS_RUNNER"] == "celery":
        app.extensions[CELERY_KEY] = make_celery(app.config)
    sqlite = str(app.config["SQLALCHEMY_DATABASE_URI"]).startswith("sqlite")
    if sqlite:
        # Requests and workers write to one file: wait for its lock rather than fail.
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 30}})
    Path(app.config["UPLOAD_FOLDER"]).mkdir(parents=True, exist_ok=True)

    db.init_app(app)
    analyses.init_app(app)
    JWTManager(app)
    if sqlite:
        with app.app_context():
            event.listen(db.engine, "connect", _sqlite_pragmas)

    app.add_url_rule("/login", view_func=login, methods=["POST"])
    app.add_url_rule("/sessions", view_func=create_session, methods=["POST"])
    app.add_url_rule("/sessions/<session_id>", view_func=show_session, methods=["GET"])
    app.add_url_rule("/sessions/<session_id>/files", view_func=upload_files, methods=["POST"])
    app.add_url_rule("/sessions/<session_id>/analysis", view_func=start_analysis, methods=["POST"])
    app.add_url_rule("/analysis/<int:analysis_id>", view_func=show_analysis, methods=["GET"])
    app.add_url_rule("/analysis/<int:analysis_id>", view_func=delete_analysis, methods=["DELETE"])
    app.add_url_rule("/video/delete", view_func=delete_video, methods=["POST"])
    app.register_error_handler(HTTPException, _json_error)
    app.cli.add_command(recover_uploads_command)
    return app
