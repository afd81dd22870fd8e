"""Cancellable Django Tasks of the test app, run by ``db_worker`` in a child process.

``hold(job_id, seconds)`` records that its body ran (a ``Result`` row ``"started"``), then
runs checkpoints for ``seconds`` (or until its job is cancelled) and returns how many.
"""

from __future__ import annotations

import time

from dbcancel import Checkpoint
from dbcancel.contrib.django.tasks import DjangoTaskJobs

from .models import Result

# A short heartbeat: a killed worker is reaped within a second (three periods).
cancellable = DjangoTaskJobs("testapp.Analysis", interval=0.05, heartbeat=0.2)


@cancellable.task()
def hold(cp: Checkpoint, job_id: int, seconds: float) -> int:
    """Run checkpoints for ``seconds``; the Result row says the body ran."""
    Result.objects.create(analysis_id=job_id, value="started")
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        cp()
        count += 1
        time.sleep(0.01)
    return count


@cancellable.task(takes_context=True)
def attempt(context: object, cp: Checkpoint, job_id: int) -> int:
    """Return the number of the attempt Django Tasks passes in its context."""
    Result.objects.create(analysis_id=job_id, value="started")
    cp()
    return int(getattr(context, "attempt", 0))


@cancellable.task()
def explode(cp: Checkpoint, job_id: int, message: str) -> None:
    """Fail the job with ``OSError(message)``."""
    Result.objects.create(analysis_id=job_id, value="started")
    raise OSError(message)


@cancellable.task()
def cancel_then_raise(cp: Checkpoint, job_id: int) -> None:
    """Cancel its own job, then raise an error of the kind a cancel causes."""
    Result.objects.create(analysis_id=job_id, value="started")
    cancellable.jobs.cancel(job_id, reason="stop now")
    raise ConnectionResetError("closed by on_cancel")
