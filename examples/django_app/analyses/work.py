"""The analysis itself: walk a folder and summarise each file, in a Django Task run by
``manage.py db_worker`` or in a background thread (``ANALYSIS_RUNNER``)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db import router

from dbcancel import Cancelled, Checkpoint
from dbcancel.contrib.django import DjangoJobs

from .models import Analysis
from .signals import file_analysed

log = logging.getLogger("analyses")


def analysis_jobs() -> DjangoJobs:
    """The ``DjangoJobs`` of analyses (cheap to build; reads the interval from settings).

    The alias is the one the project's routers pick for writing analyses: "default" in a
    project with one database.
    """
    return DjangoJobs(
        Analysis, interval=settings.ANALYSIS_INTERVAL, using=router.db_for_write(Analysis)
    )


def output_dir(analysis_id: int) -> Path:
    """Where the analysis writes its results."""
    return Path(settings.ANALYSIS_ROOT) / str(analysis_id)


def walk(folder: Path) -> Iterator[Path]:
    """The files under ``folder``, in a stable order."""
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(top) / name


def summarise(path: Path) -> str:
    """One line about one file: its size, lines and SHA-256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    lines = data.count(b"\n")
    return f"{path.name}\t{len(data)} bytes\t{lines} lines\tsha256 {digest}\n"


def analyse_files(cp: Checkpoint, analysis_id: int) -> int:
    """The work of one analysis, inside its job's run: one ``cp()`` per file.

    ``cp()`` raises ``Cancelled`` once the analysis is cancelled, from any process;
    ``jobs.run()`` around this (the task, or :func:`analyse`) swallows it and leaves the
    row cancelled. Returns the number of files analysed.
    """
    analysis = Analysis.objects.get(pk=analysis_id)
    log.info("analysis %s started: %s", analysis_id, analysis.folder)
    # Runs where the cancel is seen (the runtime thread, or the canceller's thread).
    cp.on_cancel(lambda: log.info("analysis %s cancelled: %s", analysis_id, cp.reason))
    out = output_dir(analysis_id)
    out.mkdir(parents=True, exist_ok=True)
    delay = float(settings.ANALYSIS_FILE_DELAY)
    count = 0
    for count, path in enumerate(walk(Path(analysis.folder)), start=1):
        cp()  # raises Cancelled once the analysis is cancelled
        (out / f"{count:06d}.txt").write_text(summarise(path), encoding="utf-8")
        Analysis.objects.filter(pk=analysis_id).update(files_done=count)
        file_analysed.send(Analysis, analysis_id=analysis_id, count=count, path=path)
        if delay:
            time.sleep(delay)  # stands in for heavier work per file
    log.info("analysis %s completed: %d files", analysis_id, count)
    return count


def analyse(analysis_id: int) -> None:
    """Run one analysis in this thread, to its end or until it is cancelled.

    ``jobs.run()`` moves the row to in_progress, and on the way out to completed, or
    failed with the error's text; a cancel makes ``cp()`` raise, which ``run()``
    swallows. An analysis cancelled before this thread got to it raises ``Cancelled``
    from the ``with`` statement, and its files are never read. It also closes this
    thread's database connection when the run ends.
    """
    jobs = analysis_jobs()
    try:
        with jobs.run(analysis_id) as cp:
            analyse_files(cp, analysis_id)
    except Cancelled:
        pass  # deleted before it started: nothing to do


def start(analysis_id: int) -> threading.Thread | None:
    """Start the analysis the way ``ANALYSIS_RUNNER`` says.

    ``"tasks"`` (the project's default): enqueue the Django Task
    :func:`analyses.tasks.analyse`, which ``manage.py db_worker`` runs; returns None.
    ``"thread"``: run :func:`analyse` in a daemon thread named ``analysis-<id>`` of this
    process, with no worker to start; returns the thread.
    """
    if settings.ANALYSIS_RUNNER == "tasks":
        from .tasks import analyse as analyse_task

        analyse_task.enqueue(analysis_id)
        return None
    thread = threading.Thread(
        target=analyse, args=(analysis_id,), name=f"analysis-{analysis_id}", daemon=True
    )
    thread.start()
    return thread
