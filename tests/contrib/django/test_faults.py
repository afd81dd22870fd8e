"""``DjangoJobs`` status writes survive a thread's connection that died unnoticed.

Django keeps one connection per thread; a worker's stays open from ``run()``'s enter to
its exit. When the server ends that session meanwhile (``pg_terminate_backend``,
MariaDB's ``KILL``, a restart), nothing in the client knows until the exit's write
fails. That write is one conditional UPDATE, so it can run again on a new connection:
a finished job must never be left ``in_progress`` with ``finished_at`` null.

The test ends the sessions of its worker threads, found by their server ids, from the
main thread's connection; SQLite has no server session to end. Each test counts the
sessions it ended and asserts there were some.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connections

from dbcancel import Status
from dbcancel.contrib.django import DjangoJobs

from .conftest import JOIN_TIMEOUT, check_reachable, database_param
from .testapp.models import Analysis

WORKERS = 5


@pytest.fixture(params=[database_param("postgresql"), database_param("mariadb")])
def alias(request: pytest.FixtureRequest) -> str:
    """Only the aliases with a server: there is no SQLite session to end."""
    check_reachable(request.param)
    return str(request.param)


class Boom(Exception):
    """The worker's own failure."""


def session_id(alias: str) -> int:
    """The server's id of this thread's open connection to ``alias``."""
    raw = connections[alias].connection
    assert raw is not None, "this thread has no open connection"
    if alias == "postgresql":
        return int(raw.info.backend_pid)
    return int(raw.thread_id())


def end_sessions(alias: str, ids: list[int]) -> int:
    """End those server sessions from this thread's connection; return how many ended."""
    with connections[alias].cursor() as cursor:
        for sid in ids:
            if alias == "postgresql":
                # With a timeout, returns once the backend has exited.
                cursor.execute("SELECT pg_terminate_backend(%s, 10000)", [sid])
                assert cursor.fetchone()[0], f"backend {sid} did not end"
            else:
                cursor.execute(f"KILL CONNECTION {int(sid)}")
        if alias == "mariadb":
            deadline = time.monotonic() + 30
            marks = ", ".join(["%s"] * len(ids))
            while True:  # KILL returns before the session is gone: poll the server's view
                cursor.execute(
                    f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({marks})",
                    ids,
                )
                if cursor.fetchone()[0] == 0:
                    break
                assert time.monotonic() < deadline, "the killed sessions never went away"
                time.sleep(0.02)
    return len(ids)


@dataclass
class Worker:
    """A job run in a thread, held inside ``run()`` until ``go``; see ``kind`` below.

    ``complete``: a normal exit; ``fail``: raises :class:`Boom`; ``cancel``: sees a cancel
    made by the main thread, then raises its own ``Cancelled``.
    """

    alias: str
    jobs: DjangoJobs
    job: int
    kind: str
    go: threading.Event
    entered: threading.Event = field(default_factory=threading.Event)
    cancel_sent: threading.Event = field(default_factory=threading.Event)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    session: int | None = None
    error: BaseException | None = None
    returned: bool = False
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"worker-{self.job}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:
                self.session = session_id(self.alias)
                self.entered.set()
                if self.kind == "cancel":
                    assert self.cancel_sent.wait(JOIN_TIMEOUT)
                    cp.poll()  # on the thread's connection, still alive
                    assert cp.cancelled
                    self.cancel_seen.set()
                assert self.go.wait(JOIN_TIMEOUT), "never told to leave"
                if self.kind == "fail":
                    raise Boom(f"job {self.job} failed")
                if self.kind == "cancel":
                    cp()
                    raise AssertionError("the cancel was not raised")
            self.returned = True
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(Exception):  # the test's own cleanup of a dead socket
                connections.close_all()


EXPECTED = {"complete": Status.COMPLETED, "fail": Status.FAILED, "cancel": Status.CANCELLED}


@pytest.mark.parametrize("kind", ["complete", "fail", "cancel"])
def test_run_exit_survives_a_killed_connection(alias, jobs, add, row, kind, record_property):
    """Five workers' connections are ended between enter and exit; they all leave."""
    go = threading.Event()
    workers = [Worker(alias, jobs, add(), kind, go) for _ in range(WORKERS)]
    ended = 0
    try:
        for w in workers:
            w.start()
        for w in workers:
            assert w.entered.wait(JOIN_TIMEOUT), f"job {w.job} never entered run()"
            if w.kind == "cancel":
                assert jobs.cancel(w.job, reason="from elsewhere")
                w.cancel_sent.set()
                assert w.cancel_seen.wait(JOIN_TIMEOUT), f"job {w.job} never saw its cancel"
        ended = end_sessions(alias, [w.session for w in workers if w.session is not None])
    finally:
        go.set()
        for w in workers:
            if w.thread is not None:
                w.thread.join(JOIN_TIMEOUT)
                assert not w.thread.is_alive(), f"worker of job {w.job} never finished"
    record_property("disruptions", ended)
    print(f"django {alias} run exit {kind}: {ended} session(s) killed")
    assert ended == WORKERS
    problems = []
    for w in workers:
        if kind == "fail" and not isinstance(w.error, Boom):
            problems.append(f"job {w.job}: the worker got {w.error!r}, not Boom")
        if kind != "fail" and not w.returned:
            problems.append(f"job {w.job}: the worker got {w.error!r}")
        r = row(w.job)
        if r.status != EXPECTED[kind] or r.finished_at is None:
            problems.append(f"job {w.job}: {r.status}, finished_at {r.finished_at}")
        if kind == "fail" and "Boom" not in (r.error or ""):
            problems.append(f"job {w.job}: error {r.error!r} does not name Boom")
    left = Analysis.objects.using(alias).filter(status=Status.IN_PROGRESS.value).count()
    if left:
        problems.append(f"{left} row(s) still in_progress")
    assert not problems, "\n".join(problems)


def in_progress(alias: str, add: Callable[..., int], count: int, **values: Any) -> list[int]:
    ids = [add(**values) for _ in range(count)]
    stamp = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    Analysis.objects.using(alias).filter(pk__in=ids).update(
        status=Status.IN_PROGRESS.value, started_at=stamp, heartbeat_at=stamp
    )
    return ids


def test_client_calls_survive_a_killed_connection(alias, jobs, add, row, record_property):
    """cancel, cancel_where, reap and status, each in a thread whose connection was ended."""
    one = in_progress(alias, add, 1, session_id="one")[0]
    many = in_progress(alias, add, 3, session_id="many")
    lost = in_progress(alias, add, 1, session_id="lost")[0]
    # Heartbeats are fresh for all but the lost one, so reap takes only that one.
    Analysis.objects.using(alias).filter(pk__in=[one, *many]).update(
        heartbeat_at=dt.datetime.now(dt.UTC)
    )
    calls: list[Callable[[], object]] = [
        lambda: jobs.cancel(one),
        lambda: jobs.cancel_where(session_id="many"),
        lambda: jobs.reap(stale_after=600),
        lambda: jobs.status(lost),
    ]
    sessions: list[int | None] = [None] * len(calls)
    ready = [threading.Event() for _ in calls]
    killed = threading.Event()
    outcomes: list[object] = [None] * len(calls)

    def client(i: int) -> None:
        try:
            Analysis.objects.using(alias).filter(pk=one).exists()  # opens the connection
            sessions[i] = session_id(alias)
            ready[i].set()
            assert killed.wait(JOIN_TIMEOUT)
            outcomes[i] = calls[i]()
        except BaseException as exc:
            outcomes[i] = exc
        finally:
            with contextlib.suppress(Exception):
                connections.close_all()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(calls))]
    ended = 0
    try:
        for t in threads:
            t.start()
        for event in ready:
            assert event.wait(JOIN_TIMEOUT)
        ended = end_sessions(alias, [s for s in sessions if s is not None])
    finally:
        killed.set()
        for t in threads:
            t.join(JOIN_TIMEOUT)
            assert not t.is_alive()
    record_property("disruptions", ended)
    print(f"django {alias} client calls: {ended} session(s) killed")
    assert ended == len(calls)
    assert outcomes[:3] == [True, 3, 1]
    # status read after reap or before it: either way the right answer for that moment.
    assert outcomes[3] in (Status.IN_PROGRESS, Status.FAILED)
    assert row(one).status == Status.CANCELLED
    assert [row(j).status for j in many] == [Status.CANCELLED] * 3
    reaped = row(lost)
    assert reaped.status == Status.FAILED
    assert reaped.finished_at is not None
