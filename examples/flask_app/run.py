"""Run the example app with one command: the analysis server on a thread, then Flask.

::

    python examples/flask_app/run.py                      # SQLite in examples/flask_app/instance
    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/flask_app/run.py
    python examples/flask_app/run.py --demo               # a scripted walk through the API
    python examples/flask_app/run.py --celery             # analyses on Celery workers

It brings the database up to date with the Alembic chain in ``migrations/``, restores or
purges upload folders left in the trash by an interrupted deletion, starts
``examples/analysis_server.py`` on a free loopback port and serves the API on
http://127.0.0.1:5000 (``--port``). ``--demo`` instead runs the API end to end through
Flask's test client: upload, analyse to completion, then delete a session mid-analysis.
``--celery`` queues the analyses for ``celery_worker.py`` (RabbitMQ, ``CELERY_BROKER_URL``)
instead of running them on threads of this process; the analysis server then listens on
port 8765 (``--analysis-port``), where the worker's default ``ANALYSIS_SERVER_URI`` looks.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from flask import Flask

HERE = Path(__file__).resolve().parent
# app.py next to this file, analysis_server.py one folder up.
for folder in (HERE, HERE.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from analysis_server import running_server  # noqa: E402
from app import create_app, recover_uploads  # noqa: E402


def migrate(url: str) -> None:
    """``alembic upgrade head`` on ``url``, in this process."""
    config = Config(str(HERE / "alembic.ini"))
    config.attributes["url"] = url
    command.upgrade(config, "head")


def demo(app: Flask) -> int:
    """Upload, analyse, delete mid-analysis; print each step. Returns the exit status."""
    client = app.test_client()
    token = client.post("/login", json={"username": "alice"}).get_json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}

    def call(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = client.open(path, method=method, headers=auth, **kwargs)
        body: dict[str, Any] = response.get_json()
        print(f"{method} {path} -> {response.status_code} {_short(body)}")
        return body

    def upload(session_id: str, frames: int) -> None:
        size = frames * app.config["FRAME_SIZE"]
        files = [(io.BytesIO(os.urandom(size)), f"clip{i}.mp4") for i in range(3)]
        call("POST", f"/sessions/{session_id}/files", data={"file": files})

    def wait_for(analysis_id: int, status: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            body = client.get(f"/analysis/{analysis_id}", headers=auth).get_json()
            if body["status"] == status or time.monotonic() > deadline:
                return body
            time.sleep(0.05)

    print("-- an analysis that completes")
    session = call("POST", "/sessions")["id"]
    upload(session, frames=2)
    analysis = call("POST", f"/sessions/{session}/analysis", json={"view": "front"})["id"]
    done = wait_for(analysis, "completed")
    print(f"GET /analysis/{analysis} -> {done['status']}, {len(done['results'])} files analysed")

    print("-- a session deleted while its analysis runs")
    session = call("POST", "/sessions")["id"]
    upload(session, frames=200)
    analysis = call("POST", f"/sessions/{session}/analysis")["id"]
    wait_for(analysis, "in_progress")
    deleted = call("POST", "/video/delete", json={"session_id": session})
    gone = client.get(f"/analysis/{analysis}", headers=auth).status_code
    left = Path(app.config["UPLOAD_FOLDER"], session).exists()
    print(f"GET /analysis/{analysis} -> {gone}; the session's folder exists: {left}")
    statuses = [a["status"] for a in deleted.get("analyses", [])]
    ok = (
        (done["status"], len(done["results"])) == ("completed", 3)
        and statuses == ["cancelled"]
        and gone == 404
        and not left
    )
    print("demo ok" if ok else "demo FAILED")
    return 0 if ok else 1


def _short(body: dict[str, Any] | None) -> str:
    text = str(body)
    return text if len(text) <= 100 else text[:97] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--delay", type=float, default=0.02, help="the analysis server's seconds per frame"
    )
    parser.add_argument("--demo", action="store_true", help="run the scripted walk and exit")
    parser.add_argument(
        "--celery",
        action="store_true",
        help="queue analyses for the Celery worker of celery_worker.py instead of threads",
    )
    parser.add_argument(
        "--analysis-port",
        type=int,
        default=None,
        help="the analysis server's port (default: a free one; 8765 with --celery)",
    )
    args = parser.parse_args(argv)
    # The app's lines (an analysis's start, cancel and end) and dbcancel's warnings.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flask_app").setLevel(logging.INFO)
    port = args.analysis_port if args.analysis_port is not None else (8765 if args.celery else 0)

    url = os.environ.get("DATABASE_URL") or f"sqlite:///{HERE / 'instance' / 'flask_app.db'}"
    migrate(url)
    with running_server(delay=args.delay, port=port) as server:
        config: dict[str, Any] = {
            "SQLALCHEMY_DATABASE_URI": url,
            "ANALYSIS_SERVER_URI": server.uri,
            "ANALYSIS_RUNNER": "celery" if args.celery else "thread",
        }
        if not args.celery:
            # The worker of celery mode keeps its own FRAME_SIZE (the default, unless
            # FLASK_FRAME_SIZE says otherwise): the demo sizes its uploads with the same.
            config["FRAME_SIZE"] = 4096
        app = create_app(config)
        with app.app_context():
            restored, purged = recover_uploads()
        if restored or purged:
            print(f"uploads trash: restored {restored}, purged {purged}")
        print(f"analysis server on {server.uri}, database {_hide_password(url)}")
        if args.celery:
            print(
                f"analyses go to Celery queue {app.config['CELERY_QUEUE']!r}; start the "
                "worker: celery --workdir examples/flask_app -A celery_worker worker "
                "--loglevel=INFO"
            )
        if args.demo:
            return demo(app)
        print(
            f"try: curl -s -X POST http://{args.host}:{args.port}/login "
            "-H 'Content-Type: application/json' -d '{\"username\": \"alice\"}'"
        )
        app.run(args.host, args.port, threaded=True, use_reloader=False)
    return 0


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
