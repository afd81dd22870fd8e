"""What is particular to ``DjangoJobs``: the SQL it sends, transactions, connections,
other processes. The behaviour it shares with ``Jobs`` is in tests/contract/."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from django.apps import apps
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from dbcancel import Cancelled, DbcancelError, JobNotFound, Jobs, Status
from dbcancel.contrib.django import DjangoJobs
from dbcancel.contrib.django.models import CancellableModel

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT
from .testapp.models import Analysis, Renamed, Result

ROOT = test_settings.ROOT


# -- construction (no database needed) -----------------------------------------------------


def test_is_a_jobs_with_the_same_methods():
    jobs = DjangoJobs(Analysis)
    assert isinstance(jobs, Jobs)
    assert (jobs.model, jobs.using, jobs.interval, jobs.model_name) == (
        Analysis,
        "default",
        0.5,
        "Analysis",
    )
    assert repr(jobs) == "<DjangoJobs Analysis using='default' interval=0.5>"
    public = {n for n in dir(Jobs) if not n.startswith("_")}
    assert public <= {n for n in dir(DjangoJobs) if not n.startswith("_")}


def test_model_may_be_named_by_its_label():
    assert DjangoJobs("testapp.Analysis").model is Analysis
    assert DjangoJobs("testapp.renamed", using="postgresql").model is Renamed


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (Result, TypeError, "lacks the field.*subclass dbcancel.contrib.django.models"),
        (CancellableModel, TypeError, "abstract"),
        (object, TypeError, "Django model class"),
        ("testapp.Nope", ValueError, "not an installed model"),
        ("nonsense", ValueError, "app_label.ModelName"),
    ],
)
def test_bad_model(model, error, match):
    with pytest.raises(error, match=match):
        DjangoJobs(model)


def test_bad_alias_and_interval():
    with pytest.raises(ValueError, match=r"not a database alias.*'default'"):
        DjangoJobs(Analysis, using="nowhere")
    with pytest.raises(ValueError, match="interval"):
        DjangoJobs(Analysis, interval=-1)
    with pytest.raises(ValueError, match=r"no field.*'owner'"):
        DjangoJobs(Analysis).cancel(1, where={"owner": "x"})


# -- the SQL of a transition ---------------------------------------------------------------


def _updates(ctx: CaptureQueriesContext) -> list[str]:
    return [
        q["sql"] for q in ctx.captured_queries if q["sql"].lstrip().upper().startswith("UPDATE")
    ]


def test_one_conditional_update_per_transition(alias, jobs, add, row):
    """Each transition is ONE UPDATE whose WHERE names the allowed sources; on MySQL and
    MariaDB it goes through the primary key; the CASE comes before ``status``."""
    job = add()
    conn = connections[alias]
    with CaptureQueriesContext(conn) as ctx:
        assert jobs.cancel(job, reason="r") is True
    (sql,) = _updates(ctx)
    q = conn.ops.quote_name
    assert "CASE WHEN" in sql
    assert sql.index(q("finished_at")) < sql.index(f"{q('status')} = ")
    assert "IN ('pending', 'in_progress')" in sql or "IN ('in_progress', 'pending')" in sql
    assert ("FORCE INDEX (PRIMARY)" in sql) is (alias == "mariadb")
    # The database evaluated the CASE against the old status: pending, so stopped now.
    cancelled = row(job)
    assert cancelled.status == Status.CANCELLED
    assert cancelled.finished_at is not None
    assert cancelled.finished_at == cancelled.cancel_requested_at


def test_set_order_matters_on_mariadb(alias, add, row):
    """Why the order: MariaDB evaluates SET left to right (SQL says: all from the old row)."""
    job = add()
    table = connections[alias].ops.quote_name(Analysis._meta.db_table)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET status = 'cancelled', "
            "finished_at = CASE WHEN status IN ('pending') THEN '2030-01-01 00:00:00' "
            "ELSE finished_at END WHERE id = %s",
            [job],
        )
    sees_new_status = row(job).finished_at is None
    assert sees_new_status is (alias == "mariadb")


def test_timestamps_are_aware_utc(jobs, add, row):
    job = add()
    t0 = dt.datetime.now(dt.UTC)
    with jobs.run(job):
        pass
    t1 = dt.datetime.now(dt.UTC)
    done = row(job)
    for value in (done.started_at, done.finished_at):
        assert value.utcoffset() == dt.timedelta(0)
        assert t0 - dt.timedelta(seconds=2) <= value <= t1 + dt.timedelta(seconds=2)


def test_unknown_status_is_refused_by_the_database(alias):
    from django.db import IntegrityError

    with pytest.raises(IntegrityError):
        Analysis.objects.using(alias).create(status="paused")


# -- transactions --------------------------------------------------------------------------


def test_refuses_to_write_inside_the_callers_transaction(alias, jobs, add, row):
    """Inside atomic() (ATOMIC_REQUESTS, say) a cancel would be invisible until commit."""
    job = add()
    with transaction.atomic(using=alias):
        with pytest.raises(RuntimeError, match=r"inside transaction.atomic"):
            jobs.cancel(job)
        with pytest.raises(RuntimeError, match="non_atomic_requests"):
            jobs.run(job).__enter__()
        assert jobs.status(job) is Status.PENDING  # reading is fine
    assert row(job).status == Status.PENDING


def test_complete_joins_the_callers_transaction(alias, jobs, add, row):
    job = add()
    with jobs.run(job) as cp:
        with pytest.raises(ValueError, match=r"inside `with transaction.atomic"):
            cp.complete(alias)
        with pytest.raises(ValueError, match="takes the alias"):
            complete_in(cp, "elsewhere" if alias == "default" else "default", alias)
        with transaction.atomic(using=alias):
            Result.objects.using(alias).create(analysis_id=job, value="r")
            cp.complete(alias)
            # Not committed yet: the worker's own transaction holds both.
            assert Analysis.objects.using(alias).get(pk=job).status == Status.COMPLETED
    assert row(job).status == Status.COMPLETED
    assert row(job).finished_at is not None


def complete_in(cp: Any, using: str, alias: str) -> None:
    with transaction.atomic(using=alias):
        cp.complete(using)


# -- connections in worker threads ---------------------------------------------------------


def test_worker_thread_closes_its_connection_when_the_run_ends(alias, jobs, add, threads):
    job, missing = add(), add() + 1000
    seen: dict[str, Any] = {}

    def worker() -> None:
        conn = connections[alias]
        with jobs.run(job) as cp:
            cp()
            seen["inside"] = conn.connection is not None
        seen["after run"] = conn.connection
        with pytest.raises(JobNotFound):
            jobs.run(missing).__enter__()
        seen["after a failed enter"] = conn.connection

    threads.start(worker)
    threads.join()
    assert seen == {"inside": True, "after run": None, "after a failed enter": None}


def test_main_thread_keeps_its_connection(alias, jobs, add):
    """The main thread's connection belongs to the test runner, the request, the shell."""
    job = add()
    with jobs.run(job):
        pass
    assert connections[alias].connection is not None


SERVER_CONNECTIONS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    "mariadb": "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
    "WHERE DB = DATABASE() AND ID <> CONNECTION_ID()",
}


def server_connections(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(SERVER_CONNECTIONS[alias])
        return int(cursor.fetchone()[0])


def settled(alias: str, expected: int) -> int:
    """The server's count of other connections, once it has dropped to ``expected``
    (closing is asynchronous on the server's side), or its value after 10 s."""
    deadline = time.monotonic() + 10
    count = server_connections(alias)
    while count > expected and time.monotonic() < deadline:
        time.sleep(0.02)  # polling the server's view, not synchronising our threads
        count = server_connections(alias)
    return count


def test_threads_and_tasks_leave_no_connections_behind(alias, jobs, add):
    """Worker threads (plain and asyncio's executor) that ran jobs keep no connection.

    The threads do nothing but run jobs: nothing else closes their connections.
    """
    server = alias != "default"  # SQLite has no server to count connections on
    before = server_connections(alias) if server else 0
    ids = [add() for _ in range(8)]
    errors: list[BaseException] = []

    def worker(job: int) -> None:
        try:
            with jobs.run(job) as cp:
                cp()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(job,)) for job in ids[:6]]
    for t in workers:
        t.start()
    for t in workers:
        t.join(JOIN_TIMEOUT)
    assert errors == []

    async def tasks() -> None:
        async def one(job: int) -> None:
            async with jobs.run(job) as cp:
                cp()  # nothing due: no query on the event loop
                raise Cancelled(job, "async")  # the worker gives up: recorded on exit
            assert cp.cancelled

        await asyncio.gather(*(one(job) for job in ids[6:]))

    asyncio.run(tasks())
    gc.collect()  # an unclosed connection would warn here (ResourceWarning → error)
    if server:
        assert settled(alias, before) == before
    statuses = Analysis.objects.using(alias).filter(pk__in=ids).values_list("status", flat=True)
    assert sorted(statuses) == ["cancelled"] * 2 + ["completed"] * 6


# -- other processes -----------------------------------------------------------------------


def spawn(alias: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.contrib.django.child", *args],
        cwd=ROOT,
        env=test_settings.child_env(alias),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cancel_reaches_a_worker_in_another_process(alias, jobs, add, row):
    job = add()
    child = spawn(alias, "worker", str(job))
    try:
        line = child.stdout.readline()  # blocks until the child is inside run()
        assert line == "entered\n", child.stderr.read()
        assert jobs.status(job) is Status.IN_PROGRESS
        assert jobs.cancel(job, reason="from the parent") is True
        assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED
        out, err = child.communicate(timeout=JOIN_TIMEOUT)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err
    assert out == "left cancelled\n"
    assert row(job).cancel_reason == "from the parent"


def test_cancel_from_another_process_reaches_a_worker_here(alias, jobs, add, threads):
    job = add()
    entered = threading.Event()
    outcome: list[Any] = []

    def worker() -> None:
        with jobs.run(job) as cp:
            entered.set()
            try:
                while True:
                    cp()
            except Cancelled as exc:
                outcome.append(exc.reason)
                raise

    threads.start(worker)
    assert entered.wait(JOIN_TIMEOUT)
    done = subprocess.run(
        [sys.executable, "-m", "tests.contrib.django.child", "cancel", str(job), "elsewhere"],
        cwd=ROOT,
        env=test_settings.child_env(alias),
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
    )
    assert done.stdout == "cancel returned True\n", done.stderr
    assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED
    threads.join()
    assert outcome == ["elsewhere"]  # seen at a poll: nothing in this process flipped it


# -- the core's asyncio and media code on top of DjangoJobs --------------------------------


def test_media_receive_stops_when_the_row_is_cancelled(alias, jobs, add, row):
    """``dbcancel.media.receive`` over DjangoJobs: the poller (in executor threads) sees a
    cancel made behind this process's back, and the silent stream ends with 1001."""
    media = pytest.importorskip("dbcancel.media")
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    job = add()
    closed: list[int | None] = []

    def cancel_elsewhere() -> None:
        try:
            Analysis.objects.using(alias).filter(pk=job).update(status="cancelled")
        finally:
            connections[alias].close()  # this executor thread's own query

    async def silent(ws: Any) -> None:
        await ws.wait_closed()  # never sends a frame
        closed.append(ws.close_code)

    async def main() -> list[Any]:
        received: list[Any] = []
        async with serve(silent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as ws, jobs.run(job) as cp:
                await asyncio.to_thread(cancel_elsewhere)
                async for message in media.receive(ws, cp):
                    received.append(message)
            assert cp.cancelled
        return received

    assert asyncio.run(asyncio.wait_for(main(), JOIN_TIMEOUT)) == []
    gc.collect()
    assert closed == [media.CANCEL_CLOSE_CODE]
    done = row(job)
    assert done.status == Status.CANCELLED
    assert done.finished_at is not None


def test_the_newest_jobs_id_is_not_given_to_the_next_job(alias, jobs, add):
    """Django's SQLite backend declares auto fields AUTOINCREMENT (the others never
    reuse ids): a late request for a deleted job finds nothing rather than the next."""
    first, newest = add(), add()
    assert jobs.cancel(newest)
    assert jobs.wait(newest, timeout=5) is Status.CANCELLED
    Analysis.objects.using(alias).filter(pk=newest).delete()
    following = add()
    assert following > newest > first
    with pytest.raises(JobNotFound) as info:
        jobs.status(newest)
    assert str(info.value) == f"Analysis {newest} not found"  # a read changes nothing


def test_a_missing_job_table_says_which_and_how_to_create_it(alias):
    class Meta:
        app_label = "testapp"
        db_table = "testapp_never_migrated"

    model = type("NeverMigrated", (CancellableModel,), {"__module__": __name__, "Meta": Meta})
    try:
        jobs = DjangoJobs(model, interval=0.05, using=alias)
        with pytest.raises(DbcancelError) as info:
            jobs.status(1)
        assert str(info.value) == (
            f"the table 'testapp_never_migrated' of NeverMigrated does not exist in database "
            f"{alias!r}: run manage.py migrate (and manage.py makemigrations testapp first "
            "if the model has no migration yet); nothing was changed"
        )
    finally:
        apps.all_models["testapp"].pop("nevermigrated", None)
        apps.clear_cache()
