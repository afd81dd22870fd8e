"""dbcancel.contrib.django.tasks with the real runner: ``db_worker`` of django-tasks-db.

Each test enqueues tasks of ``testapp/tasks.py`` in this process and runs the database
backend's worker as a child process on the same test database (``child.py db_worker``);
a cancel comes through a view of the test app, called with Django's test client.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from dbcancel import Status
from dbcancel.contrib.django import DjangoJobs
from dbcancel.contrib.django.tasks import (
    SHUTDOWN_REASON,
    DjangoTaskJobs,
    JobCancelled,
    JobNotRunnable,
)

from .child import start_db_worker
from .conftest import JOIN_TIMEOUT
from .routers import OneDatabase
from .testapp import tasks
from .testapp.models import Analysis, Result

try:
    from django.tasks import TaskResultStatus
except ImportError:
    from django_tasks import TaskResultStatus

CANCELLED = "dbcancel.contrib.django.tasks.JobCancelled"
NOT_RUNNABLE = "dbcancel.errors.JobNotRunnable"


@pytest.fixture
def routed(alias: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Task rows, like every unrouted query, go to this test's alias."""
    monkeypatch.setattr(OneDatabase, "alias", alias)
    return alias


def worker(alias: str) -> subprocess.Popen[str]:
    """``db_worker --batch`` on the test database of ``alias``: it runs every queued task,
    then exits."""
    return start_db_worker(alias)


def finished(proc: subprocess.Popen[str]) -> str:
    """Wait for the worker to exit cleanly; its output."""
    out, _ = proc.communicate(timeout=JOIN_TIMEOUT)
    assert proc.returncode == 0, out
    return out


def runs(alias: str, job_id: int) -> int:
    """How many times a body of ``job_id`` started."""
    return Result.objects.using(alias).filter(analysis_id=job_id, value="started").count()


def result(task: Any, enqueued: Any) -> Any:
    """The task result as the database has it now."""
    return task.get_result(enqueued.id)


def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def failed_with(task_result: Any, path: str, text: str) -> None:
    assert task_result.status == TaskResultStatus.FAILED, task_result.status
    [error] = task_result.errors
    assert error.exception_class_path == path, error.traceback
    assert text in error.traceback, error.traceback


def test_a_cancel_from_a_view_stops_the_running_task(routed, jobs, add, row):
    job_id = add()
    enqueued = tasks.hold.enqueue(job_id, 60)
    proc = worker(routed)
    try:
        until(lambda: jobs.status(job_id) is Status.IN_PROGRESS, "the worker to start the job")
        response = Client().post(f"/testapp/{job_id}/cancel/", {"reason": "user deleted it"})
        assert response.json() == {"id": job_id, "cancelled": True}
        assert jobs.wait(job_id, timeout=JOIN_TIMEOUT) is Status.CANCELLED
        out = finished(proc)
    finally:
        proc.kill()
        proc.wait()
    # The worker says it in one line with the reason, not with a traceback.
    assert "Traceback" not in out, out
    (line,) = [ln for ln in out.splitlines() if "state=FAILED" in ln]
    assert line.endswith(
        f"state=FAILED (JobCancelled: Analysis {job_id} was cancelled: user deleted it)"
    ), out
    analysis = row(job_id)
    assert analysis.status == Status.CANCELLED
    assert analysis.cancel_reason == "user deleted it"
    assert analysis.finished_at is not None
    assert runs(routed, job_id) == 1
    failed_with(result(tasks.hold, enqueued), CANCELLED, f"{job_id} was cancelled: user deleted")


def test_a_task_cancelled_before_the_worker_starts_never_runs(routed, jobs, add, row):
    job_id = add()
    enqueued = tasks.hold.enqueue(job_id, 60)
    assert jobs.cancel(job_id, reason="not needed") is True
    finished(worker(routed))
    assert runs(routed, job_id) == 0
    assert row(job_id).status == Status.CANCELLED
    failed_with(result(tasks.hold, enqueued), CANCELLED, "was cancelled: not needed")


def test_a_completed_jobs_duplicate_runs_nothing(routed, jobs, add, row):
    job_id = add()
    first = tasks.hold.enqueue(job_id, 0.1)
    finished(worker(routed))
    done = result(tasks.hold, first)
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value > 0
    assert row(job_id).status == Status.COMPLETED

    again = tasks.hold.enqueue(job_id, 0.1)
    finished(worker(routed))
    assert runs(routed, job_id) == 1
    assert row(job_id).status == Status.COMPLETED
    failed_with(result(tasks.hold, again), NOT_RUNNABLE, "is 'completed', not pending")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_a_deleted_job_and_a_failed_one_run_nothing(monkeypatch):
    monkeypatch.setattr(OneDatabase, "alias", "default")
    gone = Analysis.objects.create()
    failed = Analysis.objects.create(status=Status.FAILED)
    missing = tasks.hold.enqueue(gone.pk, 60)
    refused = tasks.hold.enqueue(failed.pk, 60)
    gone.delete()
    finished(worker("default"))
    assert Result.objects.count() == 0
    failed_with(result(tasks.hold, missing), CANCELLED, "was cancelled: deleted")
    failed_with(result(tasks.hold, refused), NOT_RUNNABLE, "is 'failed', not pending")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_takes_context_passes_the_context_first(monkeypatch):
    monkeypatch.setattr(OneDatabase, "alias", "default")
    job = Analysis.objects.create()
    enqueued = tasks.attempt.enqueue(job.pk)
    finished(worker("default"))
    done = result(tasks.attempt, enqueued)
    assert done.status == TaskResultStatus.SUCCESSFUL, done.errors
    assert done.return_value == 1
    assert DjangoJobs(Analysis).status(job.pk) is Status.COMPLETED


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_a_warm_shutdown_cancels_the_running_job(monkeypatch):
    """SIGTERM: db_worker finishes its task; the task's job is cancelled, so it stops."""
    monkeypatch.setattr(OneDatabase, "alias", "default")
    jobs = DjangoJobs(Analysis, interval=0.05)
    job_id = Analysis.objects.create().pk
    enqueued = tasks.hold.enqueue(job_id, 60)
    proc = worker("default")
    try:
        until(lambda: jobs.status(job_id) is Status.IN_PROGRESS, "the worker to start the job")
        until(lambda: runs("default", job_id) == 1, "the body to start")
        proc.send_signal(signal.SIGTERM)
        assert jobs.wait(job_id, timeout=JOIN_TIMEOUT) is Status.CANCELLED
        out = finished(proc)
    finally:
        proc.kill()
        proc.wait()
    assert "shutting down gracefully" in out
    assert Analysis.objects.get(pk=job_id).cancel_reason == SHUTDOWN_REASON
    failed_with(result(tasks.hold, enqueued), CANCELLED, f"was cancelled: {SHUTDOWN_REASON}")


def test_the_decorator_refuses_async_bodies_and_bad_options():
    cancellable = DjangoTaskJobs(Analysis)

    async def body(cp: Any, job_id: int) -> None:
        pass

    with pytest.raises(TypeError, match="is async"):
        cancellable.task()(body)
    with pytest.raises(ValueError, match="on_shutdown"):
        DjangoTaskJobs(Analysis, on_shutdown="later")  # type: ignore[arg-type]
    assert tasks.cancellable.task_names == {
        f"tests.contrib.django.testapp.tasks.{name}"
        for name in ("hold", "attempt", "explode", "cancel_then_raise")
    }
    assert JobCancelled("Analysis", 3, "gone").reason == "gone"
    assert "runs at most once" in str(JobNotRunnable("Analysis", 3, "completed"))


def test_import_without_django_tasks_names_the_extra():
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                for blocked in ("django.tasks", "django_tasks"):
                    if name == blocked or name.startswith(blocked + "."):
                        raise ImportError(f"No module named {name!r}")
        sys.meta_path.insert(0, Block())
        try:
            import dbcancel.contrib.django.tasks
        except ImportError as err:
            print(err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "pip install 'dbcancel[django-tasks]'" in out


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_any_backend_that_records_what_the_task_raised_works_alike(monkeypatch):
    """Django's ImmediateBackend runs the task inside enqueue(), in this thread."""
    monkeypatch.setattr(OneDatabase, "alias", "default")
    immediate = tasks.hold.using(backend="immediate")
    done = Analysis.objects.create()
    assert immediate.enqueue(done.pk, 0.05).status == TaskResultStatus.SUCCESSFUL
    assert DjangoJobs(Analysis).status(done.pk) is Status.COMPLETED
    again = immediate.enqueue(done.pk, 0.05)
    failed_with(again, NOT_RUNNABLE, "is 'completed', not pending")

    cancelled = Analysis.objects.create()
    assert tasks.cancellable.jobs.cancel(cancelled.pk, reason="early") is True
    failed_with(immediate.enqueue(cancelled.pk, 60), CANCELLED, "was cancelled: early")
    assert runs("default", done.pk) == 1
    assert runs("default", cancelled.pk) == 0

    running = Analysis.objects.create(status=Status.IN_PROGRESS)
    failed_with(immediate.enqueue(running.pk, 60), NOT_RUNNABLE, "is 'in_progress'")
    assert runs("default", running.pk) == 0
    assert Analysis.objects.get(pk=running.pk).status == Status.IN_PROGRESS

    broken = Analysis.objects.create()
    failed_with(
        tasks.explode.using(backend="immediate").enqueue(broken.pk, "disk full"),
        "builtins.OSError",
        "disk full",
    )
    assert Analysis.objects.get(pk=broken.pk).error == "OSError: disk full"

    # An error the body raises once its job is cancelled counts as the cancel.
    stopped = Analysis.objects.create()
    outcome = tasks.cancel_then_raise.using(backend="immediate").enqueue(stopped.pk)
    failed_with(outcome, CANCELLED, "was cancelled: stop now")
    assert "closed by on_cancel" in outcome.errors[0].traceback
    assert Analysis.objects.get(pk=stopped.pk).status == Status.CANCELLED
