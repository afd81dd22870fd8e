"""The example project (examples/django_app): its delete view on every database, and its
``demo`` command run as the README says."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django_tasks_db.models import DBTaskResult

import dbcancel
from dbcancel import Status

from . import settings as test_settings
from .child import start_db_worker
from .conftest import JOIN_TIMEOUT
from .routers import OneDatabase

analyses_models = pytest.importorskip("analyses.models")
signals = pytest.importorskip("analyses.signals")
work = pytest.importorskip("analyses.work")
Analysis = analyses_models.Analysis
FILES = 400


@pytest.fixture
def example(alias: str, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example app on this test's alias, with its folders in ``tmp_path``; returns
    the inputs folder, holding one folder "batch" of FILES files."""
    monkeypatch.setattr(OneDatabase, "alias", alias)
    settings.ANALYSIS_INPUTS = tmp_path / "inputs"
    settings.ANALYSIS_ROOT = tmp_path / "outputs"
    batch = tmp_path / "inputs" / "batch"
    batch.mkdir(parents=True)
    for n in range(FILES):
        (batch / f"f{n:04d}.txt").write_text(f"{n}\n" * (n % 5 + 1))
    return batch


@pytest.fixture
def client(example: Path) -> Client:
    """A client logged in as alice (created in the test's database)."""
    c = Client()
    c.force_login(get_user_model().objects.create_user("alice"))
    return c


@pytest.fixture
def held_at() -> Iterator[Callable[[int], threading.Event]]:
    """``held_at(n)``: the worker stops at its n-th file until its analysis is cancelled.

    Returns an Event set once the worker is held there. The hold ends through the public
    API: the checkpoint of the job running in the worker's thread (``dbcancel.current()``)
    runs an ``on_cancel`` callback the moment a cancel is issued in this process. So a
    test knows the analysis is midway, and no worker races to its end meanwhile.
    """
    holds: dict[int, threading.Event] = {}

    def receiver(sender: Any, count: int, **kwargs: Any) -> None:
        reached = holds.get(count)
        if reached is None:
            return
        cancelled = threading.Event()
        cp = dbcancel.current()
        assert cp is not None
        cp.on_cancel(cancelled.set)
        reached.set()
        cancelled.wait(JOIN_TIMEOUT)

    signals.file_analysed.connect(receiver, dispatch_uid="test-held-at")

    def held(n: int) -> threading.Event:
        holds[n] = threading.Event()
        return holds[n]

    yield held
    signals.file_analysed.disconnect(dispatch_uid="test-held-at")


def worker_thread(pk: int) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == f"analysis-{pk}")


def start(client: Client) -> int:
    response = client.post("/analyses/start/", {"folder": "batch"})
    assert response.status_code == 201, response.content
    return int(response.json()["id"])


def test_delete_cancels_waits_and_deletes(alias, client, held_at):
    running = held_at(5)
    pk = start(client)
    thread = worker_thread(pk)
    assert running.wait(JOIN_TIMEOUT)
    response = client.post(f"/analyses/{pk}/delete/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["deleted"] == pk
    assert body["status"] == Status.CANCELLED
    assert body["files_done"] == 5  # stopped at its next checkpoint
    assert not Analysis.objects.filter(pk=pk).exists()
    assert not work.output_dir(pk).exists()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()


def test_delete_of_a_finished_analysis(alias, client):
    pk = start(client)
    worker_thread(pk).join(JOIN_TIMEOUT)
    assert client.get(f"/analyses/{pk}/").json()["status"] == Status.COMPLETED
    assert len(list(work.output_dir(pk).iterdir())) == FILES
    response = client.post(f"/analyses/{pk}/delete/")
    assert response.json() == {"deleted": pk, "status": "completed", "files_done": FILES}
    assert not work.output_dir(pk).exists()


def test_delete_of_another_users_analysis_is_a_404(alias, client, held_at):
    running = held_at(1)
    pk = start(client)
    assert running.wait(JOIN_TIMEOUT)
    mallory = Client()
    mallory.force_login(get_user_model().objects.create_user("mallory"))
    assert mallory.post(f"/analyses/{pk}/delete/").status_code == 404
    assert Analysis.objects.get(pk=pk).status == Status.IN_PROGRESS  # untouched
    assert client.post(f"/analyses/{pk}/delete/").status_code == 200
    worker_thread_gone(pk)


def worker_thread_gone(pk: int) -> None:
    for t in threading.enumerate():
        if t.name == f"analysis-{pk}":
            t.join(JOIN_TIMEOUT)


def test_worker_that_does_not_stop_in_time_gets_a_409(alias, client, settings):
    """The analysis stays cancelled; once its worker has stopped, deleting succeeds."""
    settings.ANALYSIS_STOP_TIMEOUT = 0.2
    inside, release = threading.Event(), threading.Event()

    def stuck(sender: Any, count: int, **kwargs: Any) -> None:
        if count == 3:
            inside.set()
            release.wait(JOIN_TIMEOUT)  # one very slow file: no checkpoint meanwhile

    signals.file_analysed.connect(stuck, dispatch_uid="test-stuck")
    try:
        pk = start(client)
        assert inside.wait(JOIN_TIMEOUT)
        response = client.post(f"/analyses/{pk}/delete/")
        assert response.status_code == 409
        assert Analysis.objects.get(pk=pk).status == Status.CANCELLED
        assert work.output_dir(pk).exists()  # nothing deleted under a running worker
    finally:
        release.set()
        signals.file_analysed.disconnect(dispatch_uid="test-stuck")
    worker_thread_gone(pk)
    response = client.post(f"/analyses/{pk}/delete/")
    assert response.json() == {"deleted": pk, "status": "cancelled", "files_done": 3}


def test_logout_cancels_the_sessions_analyses(alias, client, held_at):
    running = held_at(1)
    pk = start(client)
    assert running.wait(JOIN_TIMEOUT)
    client.logout()
    assert work.analysis_jobs().wait(pk, timeout=JOIN_TIMEOUT) == Status.CANCELLED
    worker_thread_gone(pk)


def test_start_refuses_folders_outside_the_inputs(alias, client):
    for folder in ("../outputs", "/etc", "missing"):
        assert client.post("/analyses/start/", {"folder": folder}).status_code == 400
    assert client.get("/analyses/").json() == {"analyses": []}


@pytest.mark.sqlite
def test_demo_command_runs_end_to_end(tmp_path):
    """``python examples/django_app/manage.py demo``, exactly as the README says."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'demo.db'}"
    env["ANALYSIS_WORK_DIR"] = str(tmp_path / "work")
    done = subprocess.run(
        [sys.executable, str(test_settings.EXAMPLE / "manage.py"), "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "OK: cancelled midway, stopped, deleted"
    assert '"status": "cancelled"' in done.stdout
    assert "row deleted: yes; output folder deleted: yes" in lines
    assert "task result: FAILED (JobCancelled)" in lines  # the analysis ran as a Django Task


def test_analyses_run_as_django_tasks_and_delete_stops_them(alias, client, settings, example):
    """ANALYSIS_RUNNER="tasks": the start view enqueues the task, a real db_worker runs it,
    and the delete view cancels it, waits for the worker to stop it, and deletes."""
    settings.ANALYSIS_RUNNER = "tasks"
    pk = start(client)
    worker = start_db_worker(
        alias, ANALYSIS_ROOT=str(settings.ANALYSIS_ROOT), ANALYSIS_FILE_DELAY=0.02
    )
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT
        while Analysis.objects.get(pk=pk).files_done < 5:
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the worker did not get going"
            time.sleep(0.02)
        response = client.post(f"/analyses/{pk}/delete/")
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["status"] == Status.CANCELLED
        assert 5 <= body["files_done"] < FILES
        assert not Analysis.objects.filter(pk=pk).exists()
        assert not work.output_dir(pk).exists()
        out, _ = worker.communicate(timeout=JOIN_TIMEOUT)
        assert worker.returncode == 0, out
    finally:
        worker.kill()
        worker.wait()
    [task_result] = DBTaskResult.objects.all()
    assert task_result.status == "FAILED"
    assert task_result.exception_class_path == "dbcancel.contrib.django.tasks.JobCancelled"
    assert "was cancelled: deleted by its owner" in task_result.traceback
