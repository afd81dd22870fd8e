"""A hypothesis state machine driving jobs through the real database.

The model knows only the transition table (``dbcancel.TRANSITIONS``): every expectation
(does this cancel change anything, may this run start, does this exit complete) is derived
from it, and after every step each job's row is compared with the model.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from dbcancel import (
    TERMINAL,
    TRANSITIONS,
    Cancelled,
    Checkpoint,
    InvalidTransition,
    JobNotFound,
    JobRun,
    Status,
)
from dbcancel.testing import FakeClock
from tests.models import Analysis, Result

INTERVAL = 1.0
MAX_EXAMPLES = 60
STEPS = 40
MAX_JOBS = 4  # "a handful": enough for cancel_where to hit several, few enough to drive
OWNER = "alice"
REASON_LENGTH = 255  # the bounded cancel_reason column

reasons = st.one_of(
    st.none(),
    st.sampled_from(["", "user deleted the session", "quota", "ü ✓ → stop"]),
    st.text(st.characters(codec="ascii", exclude_categories=["Cc", "Cs"]), max_size=20),
    st.just("x" * 300),  # longer than the column
)


@dataclass
class ModelJob:
    id: int
    session: str
    status: Status = Status.PENDING
    reason: str | None = None  # the stored cancel_reason, once cancelled
    stopped: bool = False  # finished_at is expected to be set
    cancelled_true: bool = False  # some cancel() on it returned True
    first_terminal: Status | None = None
    run: JobRun | None = None
    cp: Checkpoint | None = None
    results: int = 0  # Result rows committed with its completion
    history: list[Status] = field(default_factory=list)

    def move(self, to: Status) -> None:
        """Apply a transition the model predicted, checking it against the table."""
        assert to in TRANSITIONS[self.status], f"model bug: {self.status} -> {to}"
        self.history.append(self.status)
        self.status = to
        if to in TERMINAL and self.first_terminal is None:
            self.first_terminal = to


def snapshot(db, job_id: int) -> tuple[Any, ...]:
    with db.engine.connect() as conn:
        return tuple(
            conn.execute(
                select(
                    Analysis.status,
                    Analysis.cancel_reason,
                    Analysis.cancel_requested_at,
                    Analysis.started_at,
                    Analysis.finished_at,
                    Analysis.error,
                ).where(Analysis.id == job_id)
            ).one()
        )


def make_machine(db) -> type[RuleBasedStateMachine]:
    class JobsMachine(RuleBasedStateMachine):
        ids = Bundle("ids")

        def __init__(self) -> None:
            super().__init__()
            self.clock = FakeClock()
            self.jobs = db.jobs(clock=self.clock, interval=INTERVAL)
            # Sessions unique to this run, so cancel_where never reaches older rows.
            prefix = uuid.uuid4().hex[:12]
            self.sessions = [f"{prefix}-a", f"{prefix}-b"]
            self.model: dict[int, ModelJob] = {}

        # -- helpers ----------------------------------------------------------------

        def open_runs(self) -> list[ModelJob]:
            return [j for j in self.model.values() if j.run is not None]

        def expect_cancel(self, job: ModelJob, reason: str | None) -> bool:
            """What cancel() must return; updates the model."""
            if Status.CANCELLED in TRANSITIONS[job.status]:
                was = job.status
                job.move(Status.CANCELLED)
                job.reason = None if reason is None else reason[:REASON_LENGTH]
                if was is Status.PENDING:
                    job.stopped = True  # nobody runs it: cancel() itself stops it
                job.cancelled_true = True
                return True
            if job.status is Status.CANCELLED:
                job.cancelled_true = True
                return True
            return False  # completed or failed: nothing changes

        def leave(self, job: ModelJob, exc: BaseException | None) -> Any:
            assert job.run is not None
            run, job.run = job.run, None
            cp = job.cp
            exc_type = None if exc is None else type(exc)
            result = run.__exit__(exc_type, exc, None)
            if job.status is Status.CANCELLED:
                assert cp is not None
                assert cp.cancelled
            job.stopped = True  # every exit stamps finished_at
            return result

        # -- rules ------------------------------------------------------------------

        @precondition(lambda self: len(self.model) < MAX_JOBS)
        @rule(target=ids, which=st.integers(0, 1))
        def add(self, which: int) -> int:
            session = self.sessions[which]
            job_id = db.add(user_id=OWNER, session_id=session)
            assert job_id not in self.model
            self.model[job_id] = ModelJob(job_id, session)
            return job_id

        @rule(job_id=ids)
        def start(self, job_id: int) -> None:
            job = self.model[job_id]
            if job.run is not None and job.status is Status.CANCELLED:
                return  # one worker per job at a time in this model
            before = snapshot(db, job_id)
            run = self.jobs.run(job_id)
            if Status.IN_PROGRESS in TRANSITIONS[job.status]:
                cp = run.__enter__()
                job.move(Status.IN_PROGRESS)
                job.run, job.cp = run, cp
                assert not cp.cancelled
                assert cp.job_id == job_id
            elif job.status is Status.CANCELLED:
                # An already cancelled job: the with statement raises, the body never
                # runs, and nothing is written.
                with pytest.raises(Cancelled) as cancelled:
                    run.__enter__()
                assert (cancelled.value.job_id, cancelled.value.reason) == (job_id, job.reason)
                assert snapshot(db, job_id) == before
            else:
                with pytest.raises(InvalidTransition) as info:
                    run.__enter__()
                assert info.value.current == job.status.value
                assert info.value.wanted == Status.IN_PROGRESS.value
                assert snapshot(db, job_id) == before

        @rule(
            job_id=ids,
            reason=reasons,
            where=st.sampled_from([None, "match", "other owner", "missing"]),
        )
        def cancel(self, job_id: int, reason: str | None, where: str | None) -> None:
            job = self.model[job_id]
            if where == "missing":
                with pytest.raises(JobNotFound):
                    self.jobs.cancel(max(self.model) + 1_000_000, reason=reason)
                return
            if where == "other owner":
                before = snapshot(db, job_id)
                with pytest.raises(JobNotFound):
                    self.jobs.cancel(job_id, reason=reason, where={"user_id": "mallory"})
                assert snapshot(db, job_id) == before
                if job.cp is not None:
                    assert job.cp.cancelled == (job.status is Status.CANCELLED)
                return
            filters = {"user_id": OWNER} if where == "match" else None
            was_running_cp = job.cp if job.run is not None else None
            was_cancelled = job.status is Status.CANCELLED
            expected = self.expect_cancel(job, reason)
            assert self.jobs.cancel(job_id, reason=reason, where=filters) is expected
            if was_running_cp is not None and expected:
                # Seen at once in this process, without a poll.
                assert was_running_cp.cancelled
                if not was_cancelled:
                    # The same text as the row (bounded), as a poll in another process
                    # would see it.
                    assert was_running_cp.reason == job.reason

        # Only once something runs: cancelling every pending job early makes dull runs.
        @precondition(lambda self: self.open_runs())
        @rule(which=st.integers(0, 1))
        def cancel_where(self, which: int) -> None:
            session = self.sessions[which]
            expected = 0
            for job in self.model.values():
                if job.session == session and Status.CANCELLED in TRANSITIONS[job.status]:
                    expected += 1
                    self.expect_cancel(job, None)
            assert self.jobs.cancel_where(session_id=session) == expected
            for job in self.open_runs():
                if job.session == session:
                    assert job.cp is not None
                    assert job.cp.cancelled

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data())
        def complete(self, data: st.DataObject) -> None:
            job = data.draw(st.sampled_from(self.open_runs()))
            if Status.COMPLETED in TRANSITIONS[job.status]:
                job.move(Status.COMPLETED)
            else:
                assert job.status is Status.CANCELLED  # never completed after a cancel
            assert self.leave(job, None) is False

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data())
        def fail(self, data: st.DataObject) -> None:
            job = data.draw(st.sampled_from(self.open_runs()))
            if Status.FAILED in TRANSITIONS[job.status]:
                job.move(Status.FAILED)
            # Not swallowed: run() re-raises anything but its own Cancelled.
            assert self.leave(job, RuntimeError("worker crashed")) is False
            if job.status is Status.FAILED:
                assert db.row(job.id).error == "RuntimeError: worker crashed"

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data(), rows=st.integers(1, 3))
        def complete_in_transaction(self, data: st.DataObject, rows: int) -> None:
            """Atomic results: Result rows and the completion commit together, or neither."""
            job = data.draw(st.sampled_from(self.open_runs()))
            assert job.cp is not None
            refused: Cancelled | None = None
            try:
                with db.sessions.begin() as s:
                    s.add_all(Result(analysis_id=job.id, value=f"r{n}") for n in range(rows))
                    s.flush()
                    job.cp.complete(s)
            except Cancelled as exc:
                refused = exc
            if refused is not None:
                assert job.status is Status.CANCELLED, "complete() refused a running job"
                assert self.leave(job, refused) is True
            else:
                job.move(Status.COMPLETED)  # asserts the table allows it
                job.results = rows
                assert self.leave(job, None) is False

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data())
        def retry(self, data: st.DataObject) -> None:
            """The body asks its task queue for a retry, then leaves its run raising."""
            job = data.draw(st.sampled_from(self.open_runs()))
            assert job.cp is not None
            assert job.run is not None
            before = snapshot(db, job.id)
            moved = self.jobs._retry(job.cp, "OSError: transient")
            if Status.PENDING not in TRANSITIONS[job.status]:
                assert moved is False  # cancelled, or completed in a transaction
                assert snapshot(db, job.id) == before
                return
            assert moved is True
            job.move(Status.PENDING)
            run, job.run, job.cp = job.run, None, None
            exc = OSError("transient")
            assert run.__exit__(OSError, exc, None) is False
            row = snapshot(db, job.id)
            assert row[0] is Status.PENDING
            assert row[4] is None  # not stopped: it runs again
            assert row[5] == "OSError: transient"

        @precondition(lambda self: any(j.status is Status.CANCELLED for j in self.open_runs()))
        @rule(data=st.data())
        def exit_by_cancelled(self, data: st.DataObject) -> None:
            job = data.draw(
                st.sampled_from([j for j in self.open_runs() if j.status is Status.CANCELLED])
            )
            assert job.cp is not None
            with pytest.raises(Cancelled) as info:
                job.cp()
            assert self.leave(job, info.value) is True  # its own Cancelled is swallowed

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data(), calls=st.integers(1, 5))
        def call_checkpoint(self, data: st.DataObject, calls: int) -> None:
            job = data.draw(st.sampled_from(self.open_runs()))
            assert job.cp is not None
            for _ in range(calls):
                if job.status is Status.CANCELLED:
                    with pytest.raises(Cancelled) as info:
                        job.cp()
                    assert info.value.job_id == job.id
                else:
                    job.cp()

        @precondition(lambda self: self.open_runs())
        @rule(data=st.data(), advance=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
        def poll_after_advance(self, data: st.DataObject, advance: float) -> None:
            job = data.draw(st.sampled_from(self.open_runs()))
            assert job.cp is not None
            self.clock.advance(advance * INTERVAL)
            if job.status is Status.CANCELLED:
                with pytest.raises(Cancelled):
                    job.cp()
            else:
                job.cp()
            assert job.cp.poll() is job.status
            assert job.cp.cancelled == (job.status is Status.CANCELLED)

        # -- invariants -------------------------------------------------------------

        @invariant()
        def rows_match_the_model(self) -> None:
            if not self.model:
                return
            with db.engine.connect() as conn:
                rows = {
                    r.id: r
                    for r in conn.execute(
                        select(
                            Analysis.id,
                            Analysis.status,
                            Analysis.cancel_reason,
                            Analysis.cancel_requested_at,
                            Analysis.started_at,
                            Analysis.finished_at,
                        ).where(Analysis.id.in_(list(self.model)))
                    )
                }
            assert set(rows) == set(self.model)
            with db.engine.connect() as conn:
                results = dict(
                    conn.execute(
                        select(Result.analysis_id, func.count())
                        .where(Result.analysis_id.in_(list(self.model)))
                        .group_by(Result.analysis_id)
                    ).all()
                )
            for job in self.model.values():
                row = rows[job.id]
                assert row.status is job.status, (job, row)
                if job.first_terminal is not None:
                    assert row.status is job.first_terminal, "a terminal state changed"
                if job.cancelled_true:
                    assert row.status is Status.CANCELLED, "completed after cancel() == True"
                assert (row.finished_at is not None) == job.stopped, (job, row)
                if row.status is Status.CANCELLED:
                    assert row.cancel_requested_at is not None
                    assert row.cancel_reason == job.reason
                else:
                    assert row.cancel_requested_at is None
                ever_started = Status.IN_PROGRESS in [*job.history, job.status]
                assert (row.started_at is not None) == ever_started, (job, row)
                assert results.get(job.id, 0) == job.results, (job, row)
                if job.results:
                    assert row.status is Status.COMPLETED
                if job.run is not None:
                    assert job.cp is not None
                    assert job.cp.cancelled == (job.status is Status.CANCELLED)

        @invariant()
        def registry_lists_the_open_runs(self) -> None:
            active = sorted(e.job_id for e in self.jobs.active())
            assert active == sorted(j.id for j in self.open_runs())

        def teardown(self) -> None:
            for job in self.open_runs():
                self.leave(job, None)
            assert self.jobs.active() == ()

    return JobsMachine


@pytest.mark.slow
# A pass takes seconds; a failure is then shrunk, which hypothesis bounds at 300 s.
@pytest.mark.timeout(400)
def test_jobs_state_machine(db):
    machine = make_machine(db)
    # The machine enters and leaves runs by hand, in any order, in this thread; it runs in
    # a copy of the context so that dbcancel.current() of later tests is not affected.
    contextvars.copy_context().run(
        run_state_machine_as_test,
        machine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


def test_rolled_back_completion_still_stops_the_job(db):
    """Found while modelling ``cp.complete(session)``: the worker completes inside its own
    transaction, that transaction is then rolled back (an error after ``complete()``, which
    the worker handles), and the worker leaves ``run()`` normally.

    The contract: a normal exit moves in_progress to completed and every exit sets
    ``finished_at``; ``wait()`` must return. No results may be visible, since they were
    rolled back with the completion.
    """
    jobs = db.jobs()
    job = db.add()
    with jobs.run(job) as cp:
        try:
            with db.sessions.begin() as s:
                s.add(Result(analysis_id=job, value="lost"))
                s.flush()
                cp.complete(s)
                raise LookupError("writing the results failed after complete()")
        except LookupError:
            pass  # the worker handles its own error and leaves run() normally
    row = db.row(job)
    assert row.finished_at is not None, f"job left {row.status} and never stopped"
    # Completed (a normal exit) or failed (its completion was lost) are both defensible;
    # a job that stays in_progress with no worker is not.
    assert row.status in (Status.COMPLETED, Status.FAILED)
    assert jobs.wait(job, timeout=5) is row.status
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Result)).scalar_one() == 0
