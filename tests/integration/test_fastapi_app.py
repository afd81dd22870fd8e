"""The FastAPI example (examples/fastapi_app/) end to end: a real uvicorn process, real
HTTP and a real WebSocket client, on SQLite (aiosqlite) and PostgreSQL (psycopg async)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import Database, open_database

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "examples" / "fastapi_app"
TIMEOUT = 30.0


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ],
)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    with open_database(request.param, tmp_path_factory) as opened:
        yield opened


@pytest.fixture(scope="module")
def server(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn serving the example on the database; its base URL."""
    url = make_url(database.url)
    driver = "sqlite+aiosqlite" if database.name == "sqlite" else "postgresql+psycopg"
    folder = tmp_path_factory.mktemp("fastapi_uploads")
    env = dict(
        os.environ,
        DATABASE_URL=url.set(drivername=driver).render_as_string(hide_password=False),
        UPLOAD_FOLDER=str(folder),
        FRAME_SIZE="4096",
        ANALYSIS_DELAY="0.005",
        ANALYSIS_INTERVAL="0.5",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(APP_DIR),
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    log: list[str] = []
    try:
        base = None
        deadline = time.monotonic() + TIMEOUT
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            base = found.group(1) if found else None
        assert base is not None, "uvicorn did not start:\n" + "".join(log)
        drain.start()
        yield base
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        if drain.is_alive():
            drain.join(TIMEOUT)
        proc.stderr.close()


def call(
    base: str, method: str, path: str, user: str = "alice", body: Any = None, raw: bytes = b""
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else (raw or None)
    headers = {"X-User": user}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def new_session(base: str, *sizes: int) -> str:
    status, made = call(base, "POST", "/sessions")
    assert status == 200
    for n, size in enumerate(sizes):
        status, _ = call(
            base, "PUT", f"/sessions/{made['id']}/files/clip{n}.mp4", raw=os.urandom(size)
        )
        assert status == 200
    return str(made["id"])


def test_an_analysis_completes_with_its_results(server):
    sid = new_session(server, 40_000, 20_000)
    status, started = call(server, "POST", f"/sessions/{sid}/analysis")
    assert (status, started["status"]) == (202, "pending")
    done = until(
        lambda: (
            (a := call(server, "GET", f"/analysis/{started['id']}")[1])["status"] == "completed"
            and a
        ),
        "the analysis to complete",
    )
    assert done["results"] == [
        {"file": "clip0.mp4", "frames": 10},
        {"file": "clip1.mp4", "frames": 5},
    ]


def test_deleting_a_session_cancels_waits_and_deletes(server):
    sid = new_session(server, 2_000_000)  # ~490 frames, ~2.5 s at 5 ms each
    _, started = call(server, "POST", f"/sessions/{sid}/analysis")
    aid = started["id"]
    until(lambda: call(server, "GET", f"/analysis/{aid}")[1]["status"] == "in_progress", "a start")
    # Someone else's: a 404, and nothing is cancelled or deleted.
    assert call(server, "DELETE", f"/analysis/{aid}", user="mallory")[0] == 404
    assert call(server, "POST", "/video/delete", user="mallory", body={"session_id": sid})[0] == 404
    assert call(server, "GET", f"/analysis/{aid}")[1]["status"] == "in_progress"
    t0 = time.monotonic()
    status, deleted = call(server, "POST", "/video/delete", body={"session_id": sid})
    took = time.monotonic() - t0
    assert status == 200, deleted
    assert deleted == {
        "deleted": sid,
        "files": 1,
        "analyses": [{"id": aid, "status": "cancelled"}],
    }
    assert took < 2.0, took  # the analysis stopped at once: it did not run to its end
    assert call(server, "GET", f"/analysis/{aid}")[0] == 404
    assert call(server, "GET", f"/sessions/{sid}")[0] == 404


def test_cancel_then_delete_one_analysis(server):
    sid = new_session(server, 2_000_000)
    _, started = call(server, "POST", f"/sessions/{sid}/analysis")
    aid = started["id"]
    until(lambda: call(server, "GET", f"/analysis/{aid}")[1]["status"] == "in_progress", "a start")
    assert call(server, "POST", f"/analysis/{aid}/cancel", user="mallory")[0] == 404
    status, answer = call(server, "POST", f"/analysis/{aid}/cancel")
    assert (status, answer["cancelled"]) == (200, True)
    shown = until(
        lambda: (a := call(server, "GET", f"/analysis/{aid}")[1])["status"] == "cancelled" and a,
        "the cancel",
    )
    assert (shown["cancel_reason"], shown["results"]) == ("cancelled by its owner", None)
    status, deleted = call(server, "DELETE", f"/analysis/{aid}")
    assert (status, deleted) == (200, {"deleted": aid, "status": "cancelled"})


def test_a_live_stream_is_closed_with_1001_when_cancelled(server):
    sid = new_session(server)
    _, live = call(server, "POST", f"/sessions/{sid}/live")
    aid = live["id"]
    ws_url = server.replace("http://", "ws://") + live["stream"]
    with connect(ws_url, additional_headers={"X-User": "alice"}, open_timeout=TIMEOUT) as ws:
        for n in range(3):
            ws.send(os.urandom(1000))
            assert json.loads(ws.recv(TIMEOUT))["frame"] == n
        # The server now waits for the next frame; the cancel closes the socket anyway.
        assert call(server, "POST", f"/analysis/{aid}/cancel")[1]["cancelled"] is True
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(TIMEOUT)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "cancelled")
    shown = call(server, "GET", f"/analysis/{aid}")[1]
    assert (shown["status"], shown["cancel_reason"]) == ("cancelled", "cancelled by its owner")


def test_a_live_stream_completes_on_end_and_refuses_others(server):
    sid = new_session(server)
    _, live = call(server, "POST", f"/sessions/{sid}/live")
    ws_url = server.replace("http://", "ws://") + live["stream"]
    with (
        connect(ws_url, additional_headers={"X-User": "mallory"}, open_timeout=TIMEOUT) as ws,
        pytest.raises(ConnectionClosed) as info,
    ):
        ws.recv(TIMEOUT)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008
    with connect(ws_url, additional_headers={"X-User": "alice"}, open_timeout=TIMEOUT) as ws:
        ws.send(b"frame")
        assert json.loads(ws.recv(TIMEOUT))["frame"] == 0
        ws.send("end")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(TIMEOUT)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1000
    assert call(server, "GET", f"/analysis/{live['id']}")[1]["status"] == "completed"
