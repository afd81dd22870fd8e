"""The example Flask app's Celery worker (``examples/flask_app/celery_worker.py``), with
the marks the tests read (``celery -A tests.contrib.celery.flask_worker worker``).

It runs the example's own module unchanged and only listens: ``ready-<node>`` when the
worker consumes, and one line per event in ``events`` (``DBCANCEL_CELERY_MARKS``):
``open <analysis> <path> <pid> <monotonic>`` for each file the worker opened,
``stopped <analysis> <pid> <monotonic>`` when ``analyze_session`` left, and ``postrun
<analysis> <state> <pid> <monotonic>`` when Celery finished the task. CLOCK_MONOTONIC is
system-wide on Linux, so the test process compares these times with its own.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import signals

FOLDER = Path(__file__).resolve().parents[3] / "examples" / "flask_app"
sys.path.insert(0, str(FOLDER))

import app as example  # noqa: E402
from celery_worker import celery as app  # noqa: E402

__all__ = ["app"]

MARKS = Path(os.environ.get("DBCANCEL_CELERY_MARKS", "."))
NODE = os.environ.get("DBCANCEL_CELERY_NODE", "node")


def record(*fields: Any) -> None:
    """Append one event line: the fields, this pid, the monotonic time."""
    line = " ".join(str(f) for f in (*fields, os.getpid(), repr(time.monotonic())))
    with open(MARKS / "events", "a", encoding="utf-8") as f:
        f.write(line + "\n")


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    (MARKS / f"ready-{NODE}").write_text(str(os.getpid()), encoding="utf-8")


def _opened(sender: Any, path: Path, **_: Any) -> None:
    from dbcancel import current

    cp = current()
    record("open", None if cp is None else cp.job_id, Path(path).name)


def _stopped(sender: Any, analysis_id: int, **_: Any) -> None:
    record("stopped", analysis_id)


@signals.task_postrun.connect
def _postrun(args: Any = None, state: Any = None, **_: Any) -> None:
    record("postrun", args[0] if args else None, state)


example.file_opened.connect(_opened)
example.analysis_stopped.connect(_stopped)
