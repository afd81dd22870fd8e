"""A Django project needs no SQLAlchemy: jobs run, cancel and reap in a process that
cannot import it (see ``no_sqlalchemy.py``), on each database."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

from dbcancel import Status
from dbcancel.backend import WORKER_LOST

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT
from .no_sqlalchemy import PRELUDE
from .testapp.models import Analysis


def run_child(alias: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE, *args],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias),
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
    )


def test_a_django_project_runs_cancels_and_reaps_without_sqlalchemy(alias):
    rows = Analysis.objects.using(alias)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    done, cancelled = rows.create().pk, rows.create().pk
    lost = rows.create(
        status=Status.IN_PROGRESS.value, worker_id="gone-host:1:x", started_at=long_ago
    ).pk
    child = run_child(alias, str(done), str(cancelled), str(lost))
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["done"] == "completed"
    assert (out["cancel"], out["cancelled"], out["reason"]) == (
        True,
        "cancelled",
        "no sqlalchemy here",
    )
    assert out["lost"] == ["failed", WORKER_LOST]
    assert out["reap_output"].startswith("reaped 1 ")
    # What a Django user sees when reaching for the SQLAlchemy side by mistake.
    assert len(out["import_errors"]) == 2
    for message in out["import_errors"]:
        assert "pip install 'dbcancel[sqlalchemy]'" in message
    assert rows.get(pk=cancelled).finished_at is not None


def test_the_child_would_notice_an_import_of_sqlalchemy(alias):
    """Guards the test above: the blocker fails the child when anything imports it."""
    rows = Analysis.objects.using(alias)
    ids = [str(rows.create().pk) for _ in range(3)]
    program = PRELUDE.replace("sys.exit(", "__import__('sqlalchemy.orm'); sys.exit(")
    child = subprocess.run(
        [sys.executable, "-c", program, *ids],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias),
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
    )
    assert child.returncode != 0
    assert "No module named 'sqlalchemy" in child.stderr
