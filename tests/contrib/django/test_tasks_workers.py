"""dbcancel.contrib.django.tasks over a fleet of real ``db_worker`` processes.

Four ``db_worker`` children of django-tasks-db take tasks from the PostgreSQL test
database, as a deployment runs them: 200 tasks with random cancels, and a worker killed
with SIGKILL. (Django Tasks has no retries: the retry tests of the other queues have no
counterpart here.)
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dbcancel import Status
from dbcancel.contrib.django import DjangoJobs
from tests.contrib.queues import RowView, check_random_run, random_cancels, until

from . import settings as test_settings
from .conftest import check_reachable, database_param
from .routers import OneDatabase
from .testapp import tasks
from .testapp.models import Analysis, Result

WORKERS = 4


@pytest.fixture(params=[database_param("postgresql", pytest.mark.slow)])
def alias(request: pytest.FixtureRequest) -> str:
    """PostgreSQL only: the delivery core is the same on every database."""
    check_reachable(request.param)
    return str(request.param)


@pytest.fixture
def fleet(alias: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[str]]]:
    monkeypatch.setattr(OneDatabase, "alias", alias)
    command = [
        sys.executable, "-m", "tests.contrib.django.child", "db_worker", "--no-reload",
        "--no-startup-delay", "--interval=0.02",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            command,
            cwd=test_settings.ROOT,
            env=test_settings.child_env(alias),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(WORKERS)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def rows_of(alias: str):  # type: ignore[no-untyped-def]
    def rows(ids: list[int]) -> dict[int, RowView]:
        found = Analysis.objects.using(alias).filter(pk__in=ids)
        return {
            r.pk: RowView(Status(r.status), r.started_at, r.finished_at, r.cancel_observed_at)
            for r in found
        }

    return rows


def test_random_cancels_over_the_workers(alias: str, fleet: list[subprocess.Popen[str]]) -> None:
    jobs = DjangoJobs(Analysis, using=alias, interval=0.05)
    n = int(os.environ.get("DBCANCEL_DJANGO_TASKS", "200"))
    rng = random.Random(int(os.environ.get("DBCANCEL_DJANGO_SEED", "1")))
    ids = [int(Analysis.objects.using(alias).create().pk) for _ in range(n)]
    for job_id in ids:
        tasks.hold.enqueue(job_id, rng.uniform(0.01, 0.15))
    rows = rows_of(alias)

    def ran(job_id: int) -> bool:
        return Result.objects.using(alias).filter(analysis_id=job_id, value="started").exists()

    cancelled = random_cancels(rows, jobs, ids, WORKERS, seed=rng.randrange(1 << 30))
    check_random_run(rows, jobs, ids, cancelled, ran)


def test_sigkill_of_a_worker_is_reaped(alias: str, fleet: list[subprocess.Popen[str]]) -> None:
    jobs = DjangoJobs(Analysis, using=alias, interval=0.05, heartbeat=0.2)
    lost = int(Analysis.objects.using(alias).create().pk)
    tasks.hold.enqueue(lost, 600)
    until(lambda: jobs.status(lost) is Status.IN_PROGRESS, what="the job running")
    worker_id = Analysis.objects.using(alias).get(pk=lost).worker_id
    pid = int(worker_id.split(":")[1])  # host:pid:token
    [killed] = [p for p in fleet if p.pid == pid]
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    until(lambda: jobs.reap(stale_after=1.0), what="the killed worker's job reaped")
    assert jobs.wait(lost, timeout=10) is Status.FAILED
    assert Analysis.objects.using(alias).get(pk=lost).error == "worker lost"
    after = int(Analysis.objects.using(alias).create().pk)
    tasks.hold.enqueue(after, 0.05)
    assert jobs.wait(after, timeout=30) is Status.COMPLETED  # the others go on
