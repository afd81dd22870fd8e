"""``manage.py demo``: start an analysis, delete it midway, print what happened.

Runs the whole flow through the real views: migrate, log in a demo user, POST the start
view (the analysis runs in a background thread), and once it has analysed some files
POST the delete view, which cancels the analysis, waits for the worker to stop and
deletes its results and row.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
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
from analyses.signals import file_analysed
from analyses.work import output_dir


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

        midway = threading.Event()

        def progress(sender: Any, count: int, **kwargs: Any) -> None:
            if count >= delete_after:
                midway.set()

        file_analysed.connect(progress, weak=False, dispatch_uid="demo-progress")
        user, _ = get_user_model().objects.get_or_create(username="demo")
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        try:
            started = client.post(reverse("analyses:start"), {"folder": folder.name})
            if started.status_code != 201:
                raise CommandError(f"start failed: {started.status_code} {started.content!r}")
            pk = started.json()["id"]
            self.stdout.write(f"started analysis {pk} of {files} files in {folder}")
            if not midway.wait(60):
                raise CommandError("the analysis did not get going within 60 s")
            self.stdout.write(f"after {delete_after} files: POST /analyses/{pk}/delete/")
            t0 = time.monotonic()
            deleted = client.post(reverse("analyses:delete", args=[pk]))
            took = (time.monotonic() - t0) * 1000
            self.stdout.write(f"  -> {deleted.status_code} {deleted.content.decode()}")
        finally:
            file_analysed.disconnect(dispatch_uid="demo-progress")
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
