"""Random interleavings of watched jobs starting, finishing, being cancelled and deleted.

Hypothesis picks, for each of a handful of jobs running in their own threads, what happens
to it (finishes, cancelled here, cancelled elsewhere, row deleted) and the order of those
events; the watcher polls throughout. Whatever the interleaving: every job ends in the
state its event implies, its worker stops, and the watcher is left watching nothing.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, update

from dbcancel import Cancelled, Status
from dbcancel._runtime import runtime
from dbcancel.registry import registry
from tests.models import Analysis

TABLE = Analysis.__table__
EVENTS = ("finish", "cancel here", "cancel elsewhere", "delete")


class Worker:
    def __init__(self, jobs: Any, job: int) -> None:
        self.jobs, self.job = jobs, job
        self.finish = threading.Event()
        self.entered = threading.Event()
        self.raised: BaseException | None = None
        self.cp: Any = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:
                self.cp = cp
                self.entered.set()
                while not self.finish.wait(0.002):
                    cp()
        except BaseException as err:  # the test asserts none escapes
            self.raised = err
        finally:
            self.entered.set()


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # Drawn whole before the test body starts: a draw inside it could abort the example
    # half-way (Hypothesis stops a test whose data ran out) and leave workers running.
    case=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=6).flatmap(
        lambda events: st.tuples(st.just(events), st.permutations(range(len(events))))
    ),
)
def test_random_interleavings_of_watched_jobs(db, case):
    events, order = case
    jobs = db.jobs(interval=0.05, watch=True)
    workers = [Worker(jobs, db.add()) for _ in events]
    for w in workers:
        w.thread.start()
    for w in workers:
        assert w.entered.wait(30)
    plan = [(workers[i], events[i]) for i in order]
    for w, what in plan:
        if what == "finish":
            w.finish.set()
        elif what == "cancel here":
            assert jobs.cancel(w.job, reason="here") is True
        elif what == "cancel elsewhere":
            with db.engine.begin() as conn:
                conn.execute(
                    update(TABLE)
                    .where(TABLE.c.id == w.job)
                    .values(status="cancelled", cancel_reason="elsewhere")
                )
        else:
            with db.engine.begin() as conn:
                conn.execute(delete(TABLE).where(TABLE.c.id == w.job))
    for w in workers:
        w.thread.join(30)
        assert not w.thread.is_alive(), f"the worker of a {events} job never stopped"

    for w, what in plan:
        assert w.raised is None  # run() swallowed its own Cancelled, nothing else raised
        if what == "finish":
            assert jobs.status(w.job) is Status.COMPLETED
            assert not w.cp.cancelled
        elif what == "delete":
            assert w.cp.reason == "deleted"
        else:
            reason = "here" if what == "cancel here" else "elsewhere"
            assert (w.cp.cancelled, w.cp.reason) == (True, reason)
            assert jobs.wait(w.job, timeout=10) is Status.CANCELLED
            with pytest.raises(Cancelled):
                w.cp()
    served = runtime().database_of(jobs._backend)
    table = None if served is None else served.tables.get(jobs._backend.key)
    assert table is None or not table.watched  # every hold on every checkpoint was dropped
    assert registry.active(jobs._backend.key) == ()
