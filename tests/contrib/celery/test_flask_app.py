"""The example Flask app in celery mode: analyses on a real ``celery worker`` subprocess.

The web app runs here, behind Flask's test client, with ``ANALYSIS_RUNNER=celery``; it
queues each analysis on RabbitMQ for one prefork node running the example's
``celery_worker.py`` (through ``flask_worker.py``, which adds the marks the tests read).
Both processes share the database (PostgreSQL: cancels arrive by NOTIFY; SQLite: by the
worker's polls) and the upload folder. A deletion cancels in this process and waits for
the worker process to stop before it removes rows and files.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text

from dbcancel import Status
from tests.conftest import Database
from tests.contrib.test_flask_app import (
    FRAME_SIZE,
    Site,
    User,
    empty_database,
    engine_for,
    flask_app,
    running_server,
)

from .workers import BROKER, Node, close_app

DELAY = 0.05  # the analysis server's seconds per reply
FRAMES = 200  # frames per file: 10 s of analysis each, far longer than any test
TIMEOUT = 30.0
DATABASES = pytest.mark.parametrize("database", ["postgresql", "sqlite"], indirect=True)


def until(check: Any, what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value


@dataclass
class Deployment:
    """The web app in this process, its worker node, and the worker's event marks."""

    site: Site
    node: Node
    marks: Path
    deletions: list[float]

    def events(self, kind: str, analysis_id: int) -> list[list[str]]:
        """The worker's ``kind`` events of ``analysis_id``, their fields split."""
        path = self.marks / "events"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [line.split() for line in lines]
        return [r for r in rows if r[0] == kind and r[1] == str(analysis_id)]

    def status(self, analysis_id: int) -> str | None:
        with self.site.engine.connect() as conn:
            found = conn.execute(
                text("SELECT status FROM analysis WHERE id = :id"), {"id": analysis_id}
            ).scalar()
        return None if found is None else str(found)


@pytest.fixture(scope="module")
def deployment(
    services: None, database: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp(f"flask-celery-{database.name}")
    marks, uploads = tmp / "marks", tmp / "uploads"
    marks.mkdir()
    queue = f"dbcancel-flask-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with empty_database(database, tmp) as url, running_server(delay=DELAY) as server:
        app = flask_app.create_app(
            {
                "TESTING": True,
                "SQLALCHEMY_DATABASE_URI": url,
                "JWT_SECRET_KEY": "a test key of at least thirty-two bytes",
                "UPLOAD_FOLDER": str(uploads),
                "ANALYSIS_RUNNER": "celery",
                "CELERY_BROKER_URL": BROKER,
                "CELERY_QUEUE": queue,
            }
        )
        with app.app_context():
            flask_app.db.create_all()
        engine = engine_for(url)
        node = Node(
            "flask",
            uuid.uuid4().hex[:8],
            "prefork",
            1,
            [queue],
            url,
            marks,
            app="tests.contrib.celery.flask_worker",
            env={
                "DATABASE_URL": url,
                "UPLOAD_FOLDER": str(uploads),
                "ANALYSIS_SERVER_URI": server.uri,
                "CELERY_BROKER_URL": BROKER,
                "CELERY_QUEUE": queue,
                "FLASK_FRAME_SIZE": str(FRAME_SIZE),
                "FLASK_ANALYSIS_RECEIVE_TIMEOUT": "10.0",
            },
        )
        deletions: list[float] = []

        def deleting(sender: Any, **_: Any) -> None:
            deletions.append(time.monotonic())

        try:
            node.start().wait_ready()
            with flask_app.deletion_started.connected_to(deleting, sender=app):
                yield Deployment(Site(app, engine, uploads), node, marks, deletions)
        finally:
            node.cleanup()
            client: Celery = app.extensions[flask_app.CELERY_KEY]
            with client.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            close_app(client)
            engine.dispose()
            with app.app_context():
                flask_app.db.engine.dispose()


@pytest.fixture
def deployed(deployment: Deployment) -> Iterator[Deployment]:
    """The module's deployment, emptied after each test."""
    try:
        yield deployment
    finally:
        deployment.deletions.clear()
        (deployment.marks / "events").unlink(missing_ok=True)
        with deployment.site.engine.begin() as conn:
            for table in ("analysis", "files", "sessions"):
                conn.execute(text(f"DELETE FROM {table}"))
        shutil.rmtree(deployment.site.uploads, ignore_errors=True)
        deployment.site.uploads.mkdir()


def running_on_the_worker(d: Deployment, user: User, analysis_id: int) -> None:
    """Wait until the analysis is in progress and the worker process has opened a file."""
    until(
        lambda: (
            user.call("GET", f"/analysis/{analysis_id}").get_json()["status"]
            == Status.IN_PROGRESS.value
        ),
        "the analysis to be in progress",
    )
    opened = until(lambda: d.events("open", analysis_id), "the worker to open a file")
    assert int(opened[0][3]) != os.getpid()  # another process: the worker's pool child


def assert_stopped_before(d: Deployment, analysis_id: int, returned: float) -> None:
    """The worker left the analysis before the deletion began, and opened nothing later."""
    assert len(d.deletions) == 1, d.deletions
    started = d.deletions[0]
    stopped = d.events("stopped", analysis_id)
    assert len(stopped) == 1, stopped
    assert float(stopped[0][3]) < started < returned
    assert all(float(e[4]) < started for e in d.events("open", analysis_id))
    # Celery finished the task without success: the body was stopped, not completed.
    postrun = until(lambda: d.events("postrun", analysis_id), "Celery to finish the task")
    assert postrun[0][2] != "SUCCESS", postrun


@DATABASES
def test_deleting_a_session_waits_for_the_worker_process(deployed: Deployment) -> None:
    d = deployed
    user = d.site.user("alice")
    session_id, paths = user.session_with_files(files=2, frames=FRAMES)
    analysis_id = user.start(session_id)
    running_on_the_worker(d, user, analysis_id)

    response = user.call("POST", "/video/delete", json={"session_id": session_id})
    returned = time.monotonic()

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["analyses"] == [{"id": analysis_id, "status": Status.CANCELLED.value}]
    assert body["files"] == 2
    assert_stopped_before(d, analysis_id, returned)
    assert not any(p.exists() for p in paths)
    assert not (d.site.uploads / session_id).exists()
    assert d.site.trash() == []
    assert d.status(analysis_id) is None  # deleted, after it was cancelled
    assert user.call("GET", f"/analysis/{analysis_id}").status_code == 404
    assert "succeeded" not in d.node.tail(200)


@DATABASES
def test_deleting_an_analysis_waits_for_the_worker_process(deployed: Deployment) -> None:
    d = deployed
    user = d.site.user("bob")
    session_id, paths = user.session_with_files(files=1, frames=FRAMES)
    analysis_id = user.start(session_id)
    running_on_the_worker(d, user, analysis_id)

    response = user.call("DELETE", f"/analysis/{analysis_id}")
    returned = time.monotonic()

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"deleted": analysis_id, "status": Status.CANCELLED.value}
    assert_stopped_before(d, analysis_id, returned)
    assert d.status(analysis_id) is None
    assert all(p.exists() for p in paths)  # the session keeps its files
    assert "succeeded" not in d.node.tail(200)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_broker_that_refuses_the_task_cancels_the_analysis(
    database: Database, tmp_path: Path
) -> None:
    # Nothing listens on port 1: the send fails as with a broker that is down.
    with empty_database(database, tmp_path) as url:
        app = flask_app.create_app(
            {
                "TESTING": True,
                "SQLALCHEMY_DATABASE_URI": url,
                "JWT_SECRET_KEY": "a test key of at least thirty-two bytes",
                "UPLOAD_FOLDER": str(tmp_path / "uploads"),
                "ANALYSIS_RUNNER": "celery",
                "CELERY_BROKER_URL": "amqp://guest:secret@127.0.0.1:1//",
            }
        )
        with app.app_context():
            flask_app.db.create_all()
        site = Site(app, engine_for(url), tmp_path / "uploads")
        try:
            user = site.user("carol")
            session_id = user.call("POST", "/sessions").get_json()["id"]
            response = user.call("POST", f"/sessions/{session_id}/analysis")
            assert response.status_code == 503
            error = response.get_json()["error"]
            assert "could not be queued" in error
            assert "secret" not in error  # the broker's password stays out of the message
            analysis = user.call("GET", "/analysis/1").get_json()
            assert analysis["status"] == Status.CANCELLED.value
            assert analysis["cancel_reason"] == "could not be queued"
        finally:
            site.engine.dispose()
            with app.app_context():
                flask_app.db.engine.dispose()
