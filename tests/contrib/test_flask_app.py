"""The example Flask app (``examples/flask_app/``) end to end, on every database.

Requests go through Flask's test client; analyses stream to the real analysis server
(``examples/analysis_server.py``) on loopback, one server per test. The app gets an empty
schema (PostgreSQL), database (MariaDB) or file (SQLite) of its own next to the suite's,
whose ``analysis`` table has another shape. The app's blinker signals record, in order,
every file the worker opens and the start of every deletion.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flask_jwt_extended")
pytest.importorskip("flask_sqlalchemy")
pytest.importorskip("alembic")
pytest.importorskip("websockets")

from alembic import command
from alembic.config import Config
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url

from dbcancel import Jobs, Status
from tests.conftest import Database
from tests.integration.example_modules import EXAMPLES, SERVER_PATH, load_example

APP_FOLDER = EXAMPLES / "flask_app"
ALEMBIC_INI = APP_FOLDER / "alembic.ini"
flask_app = load_example(APP_FOLDER / "app.py")
running_server = load_example(SERVER_PATH).running_server

DELAY = 0.05  # the analysis server's seconds per reply
FRAME_SIZE = 1024
JOIN = 30.0  # bound of every wait for a worker: a hang fails instead of blocking the run
VIEW = "front"


# -- databases ------------------------------------------------------------------------


@contextmanager
def empty_database(database: Database, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty schema / database / file next to ``database``'s; dropped after."""
    name = f"dbcancel_{os.getpid()}_flask_{uuid.uuid4().hex[:6]}"
    if database.name == "sqlite":
        yield f"sqlite:///{tmp_path / name}.db"
        return
    url = make_url(database.url)
    if database.name == "postgresql":
        create, drop = f"CREATE SCHEMA {name}", f"DROP SCHEMA {name} CASCADE"
        url = url.update_query_dict({"options": f"-csearch_path={name}"})
    else:
        create, drop = f"CREATE DATABASE {name}", f"DROP DATABASE {name}"
        url = url.set(database=name)
    admin = database.engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(create))
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(drop))


def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 30})
    return create_engine(url)


# -- the app --------------------------------------------------------------------------


@dataclass
class Site:
    """The example app on one database, and what its signals recorded."""

    app: Flask
    engine: Engine
    uploads: Path
    events: list[tuple[str, str]] = field(default_factory=list)
    running_at_deletion: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def jobs(self) -> Jobs:
        with self.app.app_context():
            return flask_app.analyses.jobs

    def user(self, name: str) -> User:
        return User(self, name)

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())

    def opened_after_deletion(self) -> list[str]:
        """Files the worker opened once a deletion had begun."""
        starts = [i for i, (kind, _) in enumerate(self.events) if kind == "delete"]
        assert starts, f"no deletion started: {self.events}"
        return [what for kind, what in self.events[starts[0] :] if kind == "open"]

    def opened(self) -> list[str]:
        return [what for kind, what in self.events if kind == "open"]

    def trash(self) -> list[Path]:
        trash = self.uploads / ".trash"
        return sorted(trash.iterdir()) if trash.is_dir() else []


@dataclass
class User:
    """A logged-in user of the API."""

    site: Site
    name: str
    client: FlaskClient = field(init=False)
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.client = self.site.app.test_client()
        response = self.client.post("/login", json={"username": self.name})
        assert response.status_code == 200, response.get_json()
        self.headers = {"Authorization": f"Bearer {response.get_json()['access_token']}"}

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.open(path, method=method, headers=self.headers, **kwargs)

    def session_with_files(self, files: int, frames: int) -> tuple[str, list[Path]]:
        """A new session holding ``files`` files of ``frames`` frames; its id and paths."""
        response = self.call("POST", "/sessions")
        assert response.status_code == 201, response.get_json()
        session_id = response.get_json()["id"]
        uploads = [(io.BytesIO(content(i, frames)), f"clip {i}.mp4") for i in range(files)]
        response = self.call("POST", f"/sessions/{session_id}/files", data={"file": uploads})
        assert response.status_code == 201, response.get_json()
        paths = [self.site.uploads / f["path"] for f in response.get_json()["files"]]
        assert all(p.is_file() for p in paths)
        return session_id, paths

    def start(self, session_id: str) -> int:
        response = self.call("POST", f"/sessions/{session_id}/analysis", json={"view": VIEW})
        assert response.status_code == 202, response.get_json()
        return int(response.get_json()["id"])


def content(index: int, frames: int) -> bytes:
    """The bytes of file ``index``: ``frames`` frames that differ from each other."""
    return b"".join(
        hashlib.sha256(f"{index}/{n}".encode()).digest() * (FRAME_SIZE // 32) for n in range(frames)
    )


def expected_results(index: int, frames: int) -> list[dict[str, Any]]:
    data = content(index, frames)
    chunks = [data[i : i + FRAME_SIZE] for i in range(0, len(data), FRAME_SIZE)]
    return [
        {"frame": n, "view": VIEW, "bytes": len(c), "digest": hashlib.sha256(c).hexdigest()[:16]}
        for n, c in enumerate(chunks)
    ]


@pytest.fixture(scope="module")
def deployed(
    database: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Flask, Engine, Path]]:
    """The app on an empty database of its own, tables made by ``db.create_all()``."""
    tmp = tmp_path_factory.mktemp("flask_app")
    with empty_database(database, tmp) as url:
        app = flask_app.create_app(
            {
                "TESTING": True,
                "SQLALCHEMY_DATABASE_URI": url,
                "JWT_SECRET_KEY": "a test key of at least thirty-two bytes",
                "UPLOAD_FOLDER": str(tmp / "uploads"),
                "FRAME_SIZE": FRAME_SIZE,
                "ANALYSIS_RECEIVE_TIMEOUT": 10.0,
            }
        )
        with app.app_context():
            flask_app.db.create_all()
        engine = engine_for(url)
        try:
            yield app, engine, tmp / "uploads"
        finally:
            engine.dispose()
            with app.app_context():
                flask_app.db.engine.dispose()


@pytest.fixture
def server() -> Iterator[Any]:
    with running_server(delay=DELAY) as server:
        yield server


@pytest.fixture
def site(deployed: tuple[Flask, Engine, Path], server: Any) -> Iterator[Site]:
    """The app, talking to this test's analysis server; emptied after the test."""
    app, engine, uploads = deployed
    site = Site(app, engine, uploads)
    app.config.update(ANALYSIS_SERVER_URI=server.uri, STOP_TIMEOUT=10.0)

    def opened(sender: Flask, path: Path) -> None:
        site.events.append(("open", path.name))

    def deleting(sender: Flask, **what: Any) -> None:
        site.events.append(("delete", repr(what)))
        # What still runs as the deletion begins: in this process, and by the rows.
        with engine.connect() as conn:
            unfinished = conn.execute(text("SELECT id FROM analysis WHERE finished_at IS NULL"))
            site.running_at_deletion.append(
                ([e.job_id for e in site.jobs.active()], [r[0] for r in unfinished])
            )

    with (
        flask_app.file_opened.connected_to(opened, sender=app),
        flask_app.deletion_started.connected_to(deleting, sender=app),
    ):
        try:
            yield site
        finally:
            leftover = stop_workers(site.jobs)
            with engine.begin() as conn:
                for table in ("analysis", "files", "sessions"):
                    conn.execute(text(f"DELETE FROM {table}"))
            shutil.rmtree(uploads)
            uploads.mkdir()
    assert not leftover, f"workers still running after the test: {leftover}"


def stop_workers(jobs: Jobs) -> list[Any]:
    """Cancel and join the workers still running; return their ids."""
    running = jobs.active()
    for entry in running:
        jobs.cancel(entry.job_id, reason="test teardown")
    for entry in running:
        entry.thread.join(JOIN)
    return [entry.job_id for entry in running]


def wait_stopped(site: Site, analysis_id: int) -> Status:
    """Until the analysis's worker has stopped, thread included; its final status."""
    running = [e for e in site.jobs.active() if e.job_id == analysis_id]
    status = site.jobs.wait(analysis_id, timeout=JOIN)
    for entry in running:
        entry.thread.join(JOIN)
        assert not entry.thread.is_alive()
    return status


# -- deleting while the analysis runs -------------------------------------------------


def test_delete_session_during_analysis_stops_the_worker_first(site: Site, server: Any) -> None:
    alice = site.user("alice")
    session_id, paths = alice.session_with_files(files=3, frames=100)
    analysis_id = alice.start(session_id)
    server.wait_frames_received_sync(2, timeout=JOIN)
    running = site.jobs.active()
    assert [e.job_id for e in running] == [analysis_id]

    response = alice.call("POST", "/video/delete", json={"session_id": session_id})

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "deleted": session_id,
        "files": 3,
        "analyses": [{"id": analysis_id, "status": "cancelled"}],
    }
    # The worker had stopped before the deletion began: it opened only the first file,
    # and nothing after that.
    running[0].thread.join(JOIN)
    assert not running[0].thread.is_alive()
    assert site.running_at_deletion == [([], [])]
    assert site.opened() == [paths[0].name]
    assert site.opened_after_deletion() == []
    assert server.wait_closed_count_sync(1, timeout=JOIN) == [1001]
    assert server.close_reasons == ["cancelled"]
    assert not any(p.exists() for p in paths)
    assert not (site.uploads / session_id).exists()
    assert site.trash() == []
    assert [site.count(t) for t in ("analysis", "files", "sessions")] == [0, 0, 0]
    assert alice.call("GET", f"/analysis/{analysis_id}").status_code == 404


def test_delete_analysis_during_analysis_stops_the_worker_first(site: Site, server: Any) -> None:
    alice = site.user("alice")
    session_id, paths = alice.session_with_files(files=2, frames=100)
    analysis_id = alice.start(session_id)
    server.wait_frames_received_sync(2, timeout=JOIN)
    running = site.jobs.active()

    response = alice.call("DELETE", f"/analysis/{analysis_id}")

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"deleted": analysis_id, "status": "cancelled"}
    running[0].thread.join(JOIN)
    assert site.running_at_deletion == [([], [])]
    assert site.opened() == [paths[0].name]
    assert site.opened_after_deletion() == []
    assert server.wait_closed_count_sync(1, timeout=JOIN) == [1001]
    assert alice.call("GET", f"/analysis/{analysis_id}").status_code == 404
    # The session and its files are not the analysis's: they stay.
    listed = alice.call("GET", f"/sessions/{session_id}").get_json()
    assert listed["analyses"] == []
    assert [site.uploads / f["path"] for f in listed["files"]] == paths
    assert all(p.is_file() for p in paths)


def test_cancelled_status_is_visible_until_the_rows_go(site: Site, server: Any) -> None:
    """The cancel is durable before the deletion: GET shows ``cancelled`` once stopped."""
    alice = site.user("alice")
    session_id, _ = alice.session_with_files(files=1, frames=100)
    analysis_id = alice.start(session_id)
    server.wait_frames_received_sync(1, timeout=JOIN)
    with site.app.app_context():
        assert flask_app.analyses.jobs.cancel(analysis_id, reason="user pressed stop")
    assert wait_stopped(site, analysis_id) is Status.CANCELLED

    shown = alice.call("GET", f"/analysis/{analysis_id}").get_json()

    assert shown["status"] == "cancelled"
    assert shown["cancel_reason"] == "user pressed stop"
    assert shown["results"] is None
    assert shown["finished_at"] is not None
    assert server.wait_closed_count_sync(1, timeout=JOIN) == [1001]


# -- other users --------------------------------------------------------------------


def test_another_users_delete_changes_nothing(site: Site, server: Any) -> None:
    alice, bob = site.user("alice"), site.user("bob")
    session_id, paths = alice.session_with_files(files=2, frames=3)
    analysis_id = alice.start(session_id)
    server.wait_frames_received_sync(1, timeout=JOIN)

    attempts = [
        bob.call("POST", "/video/delete", json={"session_id": session_id}),
        bob.call("DELETE", f"/analysis/{analysis_id}"),
        bob.call("GET", f"/analysis/{analysis_id}"),
        bob.call("GET", f"/sessions/{session_id}"),
        bob.call("POST", f"/sessions/{session_id}/analysis"),
        bob.call("POST", f"/sessions/{session_id}/files", data={"file": [(io.BytesIO(b"x"), "x")]}),
    ]

    assert [r.status_code for r in attempts] == [404] * len(attempts)
    assert all("error" in r.get_json() for r in attempts)
    # Alice's analysis ran to completion, untouched.
    assert wait_stopped(site, analysis_id) is Status.COMPLETED
    shown = alice.call("GET", f"/analysis/{analysis_id}").get_json()
    assert shown["status"] == "completed"
    assert shown["results"] == [
        {"file_id": file_id, "frames": expected_results(i, 3)}
        for i, file_id in enumerate(f["id"] for f in files_of(alice, session_id))
    ]
    assert all(p.is_file() for p in paths)
    assert "delete" not in {kind for kind, _ in site.events}
    assert [site.count(t) for t in ("analysis", "files", "sessions")] == [1, 2, 1]
    assert server.wait_closed_count_sync(2, timeout=JOIN) == [1000, 1000]


def files_of(user: User, session_id: str) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = user.call("GET", f"/sessions/{session_id}").get_json()["files"]
    return files


# -- bad requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({}, "expected a JSON object with a 'session_id' field", id="no-body"),
        pytest.param(
            {"data": b"{not json", "content_type": "application/json"},
            "expected a JSON object with a 'session_id' field",
            id="malformed",
        ),
        pytest.param(
            {"json": ["s1"]}, "expected a JSON object with a 'session_id' field", id="not-an-object"
        ),
        pytest.param({"json": {}}, "missing field 'session_id'", id="missing-field"),
        pytest.param({"json": {"session": "s1"}}, "missing field 'session_id'", id="misspelt"),
        pytest.param(
            {"json": {"session_id": 7}},
            "field 'session_id' must be a non-empty string",
            id="not-a-string",
        ),
    ],
)
def test_bad_json_is_a_400_naming_the_field(site: Site, body: dict[str, Any], message: str) -> None:
    alice = site.user("alice")
    _, paths = alice.session_with_files(files=1, frames=1)

    response = alice.call("POST", "/video/delete", **body)

    assert response.status_code == 400
    assert message in response.get_json()["error"]
    assert "session_id" in response.get_json()["error"]
    assert all(p.is_file() for p in paths)
    assert site.count("sessions") == 1


def test_requests_without_a_token_are_refused(site: Site) -> None:
    client = site.app.test_client()
    assert client.post("/video/delete", json={"session_id": "s"}).status_code == 401
    assert client.post("/sessions").status_code == 401
    assert client.post("/login", json={}).get_json() == {"error": "missing field 'username'"}


# -- deletions that cannot finish -----------------------------------------------------


def test_worker_that_does_not_stop_in_time_gets_a_409_and_nothing_is_deleted(
    site: Site, server: Any
) -> None:
    alice = site.user("alice")
    session_id, paths = alice.session_with_files(files=2, frames=2)
    inside, release = threading.Event(), threading.Event()

    def stuck(sender: Flask, path: Path) -> None:
        # The worker blocks where it cannot check its checkpoint.
        inside.set()
        release.wait(JOIN)

    site.app.config["STOP_TIMEOUT"] = 0.2
    with flask_app.file_opened.connected_to(stuck, sender=site.app):
        analysis_id = alice.start(session_id)
        assert inside.wait(JOIN)
        response = alice.call("POST", "/video/delete", json={"session_id": session_id})
        release.set()

    assert response.status_code == 409
    error = response.get_json()["error"]
    assert f"analysis {analysis_id}" in error
    assert "has not stopped within 0.2 s; nothing was deleted" in error
    assert all(p.is_file() for p in paths)
    assert [site.count(t) for t in ("analysis", "files", "sessions")] == [1, 2, 1]
    assert "delete" not in {kind for kind, _ in site.events}
    # The cancel itself is durable: the worker stops at its next check, before streaming,
    # and the deletion goes through when asked again.
    assert wait_stopped(site, analysis_id) is Status.CANCELLED
    assert server.connections_total == 0
    response = alice.call("POST", "/video/delete", json={"session_id": session_id})
    assert response.status_code == 200, response.get_json()
    assert site.running_at_deletion == [([], [])]
    assert site.opened_after_deletion() == []
    assert not any(p.exists() for p in paths)


def test_a_failed_deletion_leaves_rows_and_files_together(site: Site) -> None:
    alice = site.user("alice")
    session_id, paths = alice.session_with_files(files=2, frames=1)
    # Another table still references one of the files: the DELETE of its row fails.
    with site.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE file_refs (file_id INTEGER NOT NULL, "
                "FOREIGN KEY (file_id) REFERENCES files (id))"
            )
        )
        conn.execute(text("INSERT INTO file_refs SELECT MIN(id) FROM files"))
    try:
        response = alice.call("POST", "/video/delete", json={"session_id": session_id})

        assert response.status_code == 500
        assert response.get_json() == {
            "error": f"deleting session {session_id!r} failed; nothing was deleted"
        }
        assert all(p.is_file() for p in paths)
        assert [site.count(t) for t in ("files", "sessions")] == [2, 1]
        assert site.trash() == []
    finally:
        with site.engine.begin() as conn:
            conn.execute(text("DROP TABLE file_refs"))
    response = alice.call("POST", "/video/delete", json={"session_id": session_id})
    assert response.status_code == 200, response.get_json()
    assert not any(p.exists() for p in paths)


def test_recover_uploads_after_a_crash_mid_deletion(site: Site) -> None:
    alice = site.user("alice")
    kept, kept_paths = alice.session_with_files(files=1, frames=1)
    gone, _ = alice.session_with_files(files=1, frames=1)
    trash = site.uploads / ".trash"
    trash.mkdir()
    # A crash before the commit: the folder is in the trash, the rows are still there.
    (site.uploads / kept).rename(trash / f"{kept}.0001")
    # A crash after the commit: the rows are gone, the folder is still in the trash.
    with site.engine.begin() as conn:
        conn.execute(text("DELETE FROM files WHERE session_id = :s"), {"s": gone})
        conn.execute(text("DELETE FROM sessions WHERE id = :s"), {"s": gone})
    (site.uploads / gone).rename(trash / f"{gone}.0002")

    result = site.app.test_cli_runner().invoke(args=["recover-uploads"])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "restored 1, purged 1"
    assert all(p.is_file() for p in kept_paths)
    assert site.trash() == []


# -- the command line ---------------------------------------------------------------


def test_flask_dbcancel_list_status_cancel(site: Site, server: Any) -> None:
    alice = site.user("alice")
    session_id, _ = alice.session_with_files(files=1, frames=100)
    analysis_id = alice.start(session_id)
    server.wait_frames_received_sync(1, timeout=JOIN)
    runner = site.app.test_cli_runner()

    listed = runner.invoke(args=["dbcancel", "list"])
    status = runner.invoke(args=["dbcancel", "status", str(analysis_id)])
    cancel = runner.invoke(args=["dbcancel", "cancel", str(analysis_id)])

    assert listed.exit_code == 0, listed.output
    assert str(analysis_id) in listed.output
    assert "in_progress" in listed.output
    assert status.exit_code == 0, status.output
    assert "in_progress" in status.output
    assert cancel.exit_code == 0, cancel.output
    assert wait_stopped(site, analysis_id) is Status.CANCELLED
    assert server.wait_closed_count_sync(1, timeout=JOIN) == [1001]
    after = runner.invoke(args=["dbcancel", "status", str(analysis_id)])
    assert after.exit_code == 0, after.output
    assert "cancelled" in after.output


# -- the Alembic chain --------------------------------------------------------------


def alembic_config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.attributes.update(url=url, configure_logger=False)
    return config


def schema(url: str) -> dict[str, Any]:
    """Every table's columns, keys, indexes and CHECK constraints, as the database has them."""
    engine = engine_for(url)
    try:
        insp = inspect(engine)
        tables = {}
        for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
            pk = insp.get_pk_constraint(table)
            tables[table] = {
                "columns": [
                    (
                        c["name"],
                        c["type"].compile(dialect=engine.dialect),
                        c["nullable"],
                        c.get("default"),
                    )
                    for c in insp.get_columns(table)
                ],
                "pk": (pk.get("name"), pk["constrained_columns"]),
                "fks": sorted(
                    (fk["name"], fk["constrained_columns"], fk["referred_table"])
                    for fk in insp.get_foreign_keys(table)
                ),
                "indexes": sorted(
                    (ix["name"], ix["column_names"], bool(ix["unique"]))
                    for ix in insp.get_indexes(table)
                ),
                "checks": sorted(
                    (ck["name"], " ".join(ck["sqltext"].split()))
                    for ck in insp.get_check_constraints(table)
                ),
            }
            if engine.dialect.name == "sqlite":  # whether ids of deleted rows come back
                with engine.connect() as conn:
                    sql = conn.execute(
                        text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"),
                        {"t": table},
                    ).scalar_one()
                tables[table]["autoincrement"] = "AUTOINCREMENT" in sql
        return tables
    finally:
        engine.dispose()


def test_alembic_chain_upgrades_to_the_models_and_downgrades(
    database: Database, tmp_path: Path
) -> None:
    with (
        empty_database(database, tmp_path) as migrated,
        empty_database(database, tmp_path) as created,
    ):
        config = alembic_config(migrated)
        command.upgrade(config, "0001")
        initial = schema(migrated)
        assert [c[0] for c in initial["analysis"]["columns"]] == [
            "id",
            "user_id",
            "session_id",
            "results",
        ]
        engine = engine_for(migrated)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO sessions (id, user_id) VALUES ('s1', 'alice')"))
            conn.execute(
                text(
                    "INSERT INTO analysis (user_id, session_id, results) "
                    "VALUES ('alice', 's1', '[1, 2]')"
                )
            )

        # The documented command, as a user runs it.
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(ALEMBIC_INI),
                "-x",
                f"url={migrated}",
                "upgrade",
                "head",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=EXAMPLES.parent,
        )
        assert proc.returncode == 0, proc.stderr

        engine_created = engine_for(created)
        flask_app.db.metadata.create_all(engine_created)
        engine_created.dispose()
        assert schema(migrated) == schema(created)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT user_id, session_id, results, status FROM analysis")
            ).one()
        assert tuple(row[:2]) == ("alice", "s1")
        assert row[3] == "pending"

        if database.name == "sqlite":
            assert schema(created)["analysis"]["autoincrement"] is True
        command.downgrade(config, "0001")
        assert schema(migrated) == initial
        with engine.connect() as conn:
            assert conn.execute(text("SELECT user_id FROM analysis")).scalar_one() == "alice"

        command.upgrade(config, "head")
        assert schema(migrated) == schema(created)
        # 0004 alone: the worker table as 0003 made it before, then back again.
        command.downgrade(config, "0003")
        workers = schema(migrated)["dbcancel_worker"]
        assert [c[0] for c in workers["columns"]] == ["id", "started_at", "heartbeat_at"]
        assert workers["pk"] == schema(created)["dbcancel_worker"]["pk"]
        command.upgrade(config, "head")
        assert schema(migrated) == schema(created)
        command.downgrade(config, "base")
        assert schema(migrated) == {}
        engine.dispose()


# -- the one-command runner ---------------------------------------------------------


def test_run_py_demo(database: Database, tmp_path: Path) -> None:
    with empty_database(database, tmp_path) as url:
        proc = subprocess.run(
            [sys.executable, str(APP_FOLDER / "run.py"), "--demo", "--delay", "0.01"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DATABASE_URL": url, "UPLOAD_FOLDER": str(tmp_path / "up")},
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo ok" in proc.stdout
    assert "POST /video/delete -> 200" in proc.stdout
