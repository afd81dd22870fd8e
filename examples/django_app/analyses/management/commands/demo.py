"""``manage.py demo``: start an analysis, delete it midway, print what happened.

Runs the whole flow through the real views: migrate, start a Django Tasks worker
(``manage.py db_worker``, in a child process), log in a demo user, POST the start view
(which enqueues the analysis as a task), and once it has analysed some files POST the
delete view, which cancels the analysis, waits for the worker to stop it and deletes its
results and row. With ``ANALYSIS_RUNNER=thread`` the analysis runs in a thread of this
process instead, and no worker is started.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.test import Client
from django.urls import reverse

from analyses.models import Analysis
from analyses.work import output_dir

MANAGE = Path(__file__).resolve().parents[3] / "manage.py"


@contextmanager
def db_worker(enabled: bool) -> Iterator[subprocess.Popen[bytes] | None]:
    """``manage.py db_worker`` in a child process while the block runs (when enabled)."""
    if not enabled:
        yield None
        return
    worker = subprocess.Popen(
        [
            sys.executable,
            str(MANAGE),
            "db_worker",
            "--no-reload",
            "--no-startup-delay",
            "--interval=0.1",
            "--verbosity=0",
        ]
    )
    try:
        yield worker
    finally:
        worker.terminate()  # idle by now: SIGTERM makes it exit at once
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def task_outcome(timeout: float = 10.0) -> str:
    """How the worker recorded the analysis' task, once it has: ``FAILED (JobCancelled)``."""
    from django_tasks_db.models import DBTaskResult

    deadline = time.monotonic() + timeout
    while True:
        row = DBTaskResult.objects.order_by("-enqueued_at").first()
        if row is not None and (row.finished_at is not None or time.monotonic() > deadline):
            break
        time.sleep(0.05)
    if row is None:
        return "none"
    path = row.exception_class_path.rsplit(".", 1)[-1]
    return f"{row.status} ({path})" if path else str(row.status)


class Command(BaseCommand):
    """Start → delete, end to end; exits non-zero when the outcome is not the expected one."""

    help = "Start an analysis of many files, delete it midway and print the outcome."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--files", type=int, default=1000, help="files to analyse")
        parser.add_argument(
            "--delete-after", type=int, default=50, help="delete once this many are done"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        files, delete_after = options["files"], options["delete_after"]
        if not 0 < delete_after < files:
            raise CommandError("--delete-after must be between 0 and --files")
        call_command("migrate", verbosity=0, interactive=False)
        db = connection.settings_dict
        self.stdout.write(f"database: {connection.vendor} {db['NAME']}")

        folder = Path(settings.ANALYSIS_INPUTS) / f"demo-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        for n in range(files):
            (folder / f"file{n:05d}.txt").write_text(f"line {n}\n" * (n % 7 + 1))

        user, _ = get_user_model().objects.get_or_create(username="demo")
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        tasks = settings.ANALYSIS_RUNNER == "tasks"
        with db_worker(tasks) as worker:
            try:
                if worker is not None:
                    self.stdout.write(f"worker: manage.py db_worker (pid {worker.pid})")
                started = client.post(reverse("analyses:start"), {"folder": folder.name})
                if started.status_code != 201:
                    raise CommandError(f"start failed: {started.status_code} {started.content!r}")
                pk = started.json()["id"]
                how = "as a Django Task" if tasks else "in a thread"
                self.stdout.write(f"started analysis {pk} of {files} files in {folder} ({how})")
                deadline = time.monotonic() + 60
                while Analysis.objects.get(pk=pk).files_done < delete_after:
                    if worker is not None and worker.poll() is not None:
                        raise CommandError(f"db_worker exited with {worker.returncode}")
                    if time.monotonic() > deadline:
                        raise CommandError("the analysis did not get going within 60 s")
                    time.sleep(0.01)
                self.stdout.write(f"after {delete_after} files: POST /analyses/{pk}/delete/")
                t0 = time.monotonic()
                deleted = client.post(reverse("analyses:delete", args=[pk]))
                took = (time.monotonic() - t0) * 1000
                self.stdout.write(f"  -> {deleted.status_code} {deleted.content.decode()}")
                if tasks:
                    self.stdout.write(f"task result: {task_outcome()}")
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        result = deleted.json() if deleted.status_code == 200 else {}
        row_gone = not Analysis.objects.filter(pk=pk).exists()
        output_gone = not output_dir(pk).exists()
        done = result.get("files_done", "?")
        self.stdout.write(
            f"the worker stopped after {done} of {files} files; "
            f"the delete view answered in {took:.0f} ms"
        )
        self.stdout.write(
            f"row deleted: {'yes' if row_gone else 'NO'}; "
            f"output folder deleted: {'yes' if output_gone else 'NO'}"
        )
        if not (result.get("status") == "cancelled" and row_gone and output_gone):
            raise CommandError(
                f"expected the analysis cancelled midway and deleted, got {result or deleted}"
            )
        self.stdout.write(self.style.SUCCESS("OK: cancelled midway, stopped, deleted"))
