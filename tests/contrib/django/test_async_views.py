"""``DjangoJobs`` awaited from an async view, served by uvicorn in a child process.

``acancel()``, ``await_()`` and ``astatus()`` from ``testapp.views.cancel_and_wait``: the
view cancels a job that a thread of this process runs, waits until that worker has
stopped, and reads the status; it also probes the server's loop (the largest gap of a
10 ms ticker task while the calls run, against as long a stretch without them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from dbcancel import Cancelled, Status

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT

TRIALS = 3
"""Probes of the server's loop: a call that blocks it shows in every one."""


@pytest.fixture
def server(alias: str) -> Iterator[str]:
    """uvicorn serving the test project on the test database of ``alias``; its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.contrib.django.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-access-log",
        ],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    try:
        url = None
        deadline = time.monotonic() + JOIN_TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url is not None, f"uvicorn did not start: {line!r}"
        drain.start()  # the server's log: read, so that it never blocks on a full pipe
        yield url
    finally:
        proc.terminate()
        proc.wait(JOIN_TIMEOUT)
        if drain.is_alive():
            drain.join(JOIN_TIMEOUT)
        proc.stderr.close()


def post(url: str, **form: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Host": "localhost"},  # an ALLOWED_HOSTS name
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=JOIN_TIMEOUT) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def test_an_async_view_cancels_and_waits_without_blocking_its_loop(
    server, alias, jobs, add, row, threads
):
    answers = []
    for trial in range(TRIALS):
        job = add()
        entered = threading.Event()
        seen: list[str | None] = []

        def worker(job: int = job, entered: threading.Event = entered) -> None:
            with jobs.run(job) as cp:
                entered.set()
                try:
                    while True:
                        cp()
                        time.sleep(0.002)
                except Cancelled as exc:
                    seen.append(exc.reason)  # noqa: B023 - read in this trial
                    raise

        threads.start(worker, name=f"worker-{trial}")
        assert entered.wait(JOIN_TIMEOUT)
        answer = post(f"{server}/testapp/{job}/cancel-and-wait/", reason="from an async view")
        answers.append(answer)
        assert answer["cancelled"] is True
        assert answer["final"] == answer["status"] == "cancelled"
        assert seen == ["from an async view"]
        analysis = row(job)
        assert analysis is not None
        assert analysis.status == Status.CANCELLED
        assert analysis.finished_at is not None  # stopped before the view returned
        if answer["loaded_ms"] <= 2 * answer["control_ms"]:
            break
    threads.join()
    assert answers[-1]["loaded_ms"] <= 2 * answers[-1]["control_ms"], (
        "the server's loop was blocked in every trial: "
        + "; ".join(f"{a['loaded_ms']:.1f} ms vs {a['control_ms']:.1f} ms idle" for a in answers)
    )


# -- AsyncJobs and DjangoJobs on one table -------------------------------------------------


def async_jobs_of(alias: str, interval: float) -> Any:
    """An ``AsyncJobs`` on the test app's table in the test database of ``alias`` (asyncpg,
    aiosqlite or aiomysql), made inside the running loop."""
    from django.db import connections
    from sqlalchemy import MetaData, Table, create_engine
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import create_async_engine

    from dbcancel import AsyncJobs

    from .testapp.models import Analysis

    entry = connections[alias].settings_dict
    if entry["ENGINE"].endswith("sqlite3"):
        sync_url = URL.create("sqlite", database=entry["NAME"])
        async_driver = "sqlite+aiosqlite"
    else:
        postgresql = entry["ENGINE"].endswith("postgresql")
        sync_url = URL.create(
            "postgresql+psycopg" if postgresql else "mysql+pymysql",
            username=entry["USER"] or None,
            password=entry["PASSWORD"] or None,
            host=entry["HOST"] or None,
            port=int(entry["PORT"]) if entry["PORT"] else None,
            database=entry["NAME"],
        )
        async_driver = "postgresql+asyncpg" if postgresql else "mysql+aiomysql"
    sync = create_engine(sync_url)
    try:
        table = Table(Analysis._meta.db_table, MetaData(), autoload_with=sync)
    finally:
        sync.dispose()
    engine = create_async_engine(sync_url.set(drivername=async_driver))
    return AsyncJobs(engine, table, interval=interval)


def closing_connections(fn: Any) -> Any:
    """``fn`` for a thread of the loop's executor: Django's connections of that thread are
    closed afterwards (an executor thread outlives the call)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        from django.db import connections

        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    return call


def test_a_django_cancel_stops_an_async_job_and_the_other_way_round(alias, jobs, add, threads):
    """The two ORMs share no registry (their keys differ), so each side's cancel reaches
    the other's job through the database: NOTIFY on PostgreSQL at an interval of 10 s,
    where a poll would come too late; a poll elsewhere."""
    import asyncio

    from dbcancel.contrib.django import DjangoJobs

    from .testapp.models import Analysis

    postgresql = alias == "postgresql"
    interval = 10.0 if postgresql else 0.05
    django_jobs = DjangoJobs(Analysis, interval=interval, using=alias)
    looped, threaded = add(), add()
    entered, left = threading.Event(), threading.Event()
    reasons: list[str | None] = []

    def worker() -> None:
        with django_jobs.run(threaded) as cp:
            entered.set()
            try:
                while True:
                    cp()
                    time.sleep(0.002)
            except Cancelled as exc:
                reasons.append(exc.reason)
                raise
            finally:
                left.set()

    async def main() -> tuple[float, float]:
        ajobs = async_jobs_of(alias, interval)
        try:
            seen = asyncio.Event()
            async with ajobs.run(looped) as cp:
                cp.on_cancel(seen.set)
                if postgresql:
                    async with asyncio.timeout(JOIN_TIMEOUT):
                        while not ajobs.stats().listening:
                            await asyncio.sleep(0.01)
                cancel = closing_connections(django_jobs.cancel)
                assert await asyncio.to_thread(cancel, looped, reason="from Django") is True
                t0 = time.monotonic()
                async with asyncio.timeout(JOIN_TIMEOUT):
                    await seen.wait()
                to_async = time.monotonic() - t0
                assert cp.reason == "from Django"

            threads.start(worker, name="django-worker")
            assert await asyncio.to_thread(entered.wait, JOIN_TIMEOUT)
            await asyncio.sleep(0.2)  # the Django side's listener is up by now
            assert await ajobs.cancel(threaded, reason="from AsyncJobs") is True
            t0 = time.monotonic()
            assert await asyncio.to_thread(left.wait, JOIN_TIMEOUT)
            to_django = time.monotonic() - t0
            assert await ajobs.wait(threaded, timeout=JOIN_TIMEOUT) is Status.CANCELLED
            return to_async, to_django
        finally:
            await ajobs._engine.dispose()

    to_async, to_django = asyncio.run(main())
    threads.join()
    assert reasons == ["from AsyncJobs"]
    assert to_async < 3.0, to_async
    assert to_django < 3.0, to_django
    assert jobs.status(looped) is Status.CANCELLED
