"""The worker table's migrations (``dbcancel.contrib.django``'s own app), and new code on
a worker table that predates ``expires_at``, on every database.

``0002_worker_expires_at`` adds the column. Before it has run (a deploy that starts the
new code first, a rolling upgrade beside processes of the older dbcancel), jobs still
beat and reap, judged by ``stale_after`` alone, and one warning says what to run.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator

import pytest
from django.apps import apps
from django.db import connections
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.questioner import NonInteractiveMigrationQuestioner
from django.db.migrations.state import ProjectState

import dbcancel.backend
from dbcancel import DbcancelError, Status
from dbcancel.contrib.django import DjangoJobs
from dbcancel.contrib.django.backend import DjangoBackend
from dbcancel.contrib.django.models import Worker
from dbcancel.models import WORKER_TABLE

from .testapp.models import Analysis

BEFORE = ("dbcancel", "0001_worker")
LATEST = ("dbcancel", "0002_worker_expires_at")
WORKER = "other-host:1:aa"


def test_the_apps_migrations_match_its_models():
    """``makemigrations`` finds nothing to do for dbcancel's app: 0002 is the Worker model."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    autodetector = MigrationAutodetector(
        loader.project_state(),
        ProjectState.from_apps(apps),
        NonInteractiveMigrationQuestioner(specified_apps={"dbcancel"}, dry_run=True),
    )
    assert "dbcancel" not in autodetector.changes(graph=loader.graph, trim_to_apps={"dbcancel"})
    assert loader.graph.leaf_nodes("dbcancel") == [LATEST]


def worker_columns(alias: str) -> list[str]:
    connection = connections[alias]
    with connection.cursor() as cursor:
        description = connection.introspection.get_table_description(cursor, WORKER_TABLE)
    return [column.name for column in description]


def migrate(alias: str, target: tuple[str, str]) -> None:
    executor = MigrationExecutor(connections[alias])
    executor.migrate([target])


@pytest.fixture
def before_0002(alias: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker table as migration 0001 made it, for the test; migrated back after.

    The warning about an old worker table is said once per process and database: the
    test gets a fresh record of what was said.
    """
    monkeypatch.setattr(dbcancel.backend, "_warned_old_tables", set())
    migrate(alias, BEFORE)
    try:
        yield
    finally:
        migrate(alias, LATEST)


def test_migration_0002_adds_expires_at_and_its_reverse_drops_it(alias, before_0002):
    assert worker_columns(alias) == ["id", "started_at", "heartbeat_at"]
    migrate(alias, LATEST)
    assert worker_columns(alias) == ["id", "started_at", "heartbeat_at", "expires_at"]
    backend = DjangoBackend(Analysis, alias)
    backend.beat_worker(WORKER, 6)
    worker = Worker.objects.using(alias).get(pk=WORKER)
    assert worker.expires_at == worker.heartbeat_at + dt.timedelta(seconds=18)
    migrate(alias, BEFORE)
    assert worker_columns(alias) == ["id", "started_at", "heartbeat_at"]


def test_new_code_on_the_old_worker_table_beats_reaps_and_warns_once(
    alias: str,
    before_0002: None,
    add: Callable[..., int],
    row: Callable[[int], Analysis | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dbcancel")
    backend = DjangoBackend(Analysis, alias)
    backend.beat_worker(WORKER, 6)  # inserts, without the column
    backend.beat_worker(WORKER, 6)  # updates
    workers = Worker.objects.using(alias).filter(pk=WORKER)
    (beat,) = workers.values_list("heartbeat_at", flat=True)
    assert abs(beat - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
    job = add(status=Status.IN_PROGRESS, worker_id=WORKER, started_at=beat)
    assert backend.reap(3, "worker lost") == 0
    # 4 s without a beat: without expires_at, stale_after alone judges, as before.
    workers.update(heartbeat_at=beat - dt.timedelta(seconds=4))
    assert backend.reap(3, "worker lost") == 1
    failed = row(job)
    assert failed is not None
    assert (failed.status, failed.error) == (Status.FAILED, "worker lost")
    assert not workers.exists()  # its last job stopped: the stale row went too
    # Another backend on the same database finds the column missing again, silently.
    DjangoBackend(Analysis, alias).beat_worker(WORKER, 6)
    warned = [r for r in caplog.records if "no expires_at column" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert warned[0].levelno == logging.WARNING
    assert "manage.py migrate dbcancel" in warned[0].getMessage()


@pytest.fixture
def no_worker_table(alias: str) -> Iterator[None]:
    """dbcancel's app migrated to zero (no worker table) for the test; migrated back after."""
    migrate(alias, ("dbcancel", None))  # type: ignore[arg-type]
    try:
        yield
    finally:
        migrate(alias, LATEST)


@pytest.mark.parametrize("op", ["status", "cancel", "run"])
def test_a_missing_worker_table_is_one_clear_error_at_the_first_use(
    alias: str, no_worker_table: None, op: str
) -> None:
    job = Analysis.objects.using(alias).create().pk
    jobs = DjangoJobs(Analysis, interval=0.05, using=alias)

    def call() -> None:
        if op == "run":
            with jobs.run(job):
                pass
        else:
            getattr(jobs, op)(job)

    with pytest.raises(DbcancelError) as info:
        call()
    err = info.value
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    assert str(err) == (
        f"the worker table {WORKER_TABLE!r} does not exist in database {alias!r}: every "
        "process that runs jobs beats its row there, and reap() reads it: add "
        "'dbcancel.contrib.django' to INSTALLED_APPS and run manage.py migrate; nothing "
        "was changed"
    )
    assert Analysis.objects.using(alias).get(pk=job).status == Status.PENDING
