"""Helpers shared by the tests that run real task-queue workers (RQ, Dramatiq)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dbcancel import Jobs, Status
from tests.conftest import Database
from tests.models import Analysis

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def until(check: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def ran(marks: Path, job_id: int) -> list[str]:
    """One line (the pid) per run of the body of ``job_id``."""
    path = marks / f"ran-{job_id}"
    return path.read_text().splitlines() if path.exists() else []


class Process:
    """A worker subprocess in a session of its own, logging to a file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(cmd),
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def text(self) -> str:
        """The whole log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the process's whole session at once."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL the session after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()


@dataclass(frozen=True)
class RowView:
    """What the invariants read of a job's row, from either ORM."""

    status: Status
    started_at: Any
    finished_at: Any
    cancel_observed_at: Any


def sqlalchemy_rows(db: Database) -> Callable[[list[int]], dict[int, RowView]]:
    def rows(ids: list[int]) -> dict[int, RowView]:
        with db.sessions() as s:
            found = s.scalars(select(Analysis).where(Analysis.id.in_(ids)))
            return {
                r.id: RowView(r.status, r.started_at, r.finished_at, r.cancel_observed_at)
                for r in found
            }

    return rows


def random_cancels(
    rows: Callable[[list[int]], dict[int, RowView]],
    jobs: Jobs,
    ids: list[int],
    slots: int,
    seed: int = 1,
) -> dict[int, bool]:
    """Cancel 60 % of ``ids``: a third at random moments of the whole run (most are then
    queued or done), two thirds at a random moment of their own run, once seen running.
    Returns what each cancel returned."""
    rng = random.Random(seed)
    chosen = rng.sample(ids, len(ids) * 3 // 5)
    anytime, running = chosen[: len(chosen) // 3], set(chosen[len(chosen) // 3 :])
    horizon = len(ids) * 0.1 / slots
    start = time.monotonic()
    due = {job_id: start + rng.uniform(0, horizon) for job_id in anytime}
    cancelled: dict[int, bool] = {}
    deadline = start + 120
    while (due or running) and time.monotonic() < deadline:
        now = time.monotonic()
        for job_id, row in rows(list(running)).items():
            if row.status is Status.IN_PROGRESS and job_id not in due:
                due[job_id] = now + rng.uniform(0, 0.1)
            elif row.status is not Status.PENDING and job_id not in due:
                running.discard(job_id)  # finished before it was seen running
        for job_id, at in list(due.items()):
            if at <= now:
                cancelled[job_id] = jobs.cancel(job_id, reason="random")
                del due[job_id]
                running.discard(job_id)
        time.sleep(0.01)  # the pace of the canceller's loop, not a synchronisation
    assert not due, "the canceller ran out of time"
    assert not running, "the canceller ran out of time"
    return cancelled


def check_random_run(
    rows: Callable[[list[int]], dict[int, RowView]],
    jobs: Jobs,
    ids: list[int],
    cancelled: dict[int, bool],
    ran: Callable[[int], Any],
) -> dict[int, Status]:
    """The invariants of a run with random cancels; returns the final statuses."""
    deadline = time.monotonic() + 120
    final = {j: jobs.wait(j, timeout=max(1.0, deadline - time.monotonic())) for j in ids}
    found = rows(ids)
    won = [j for j, ok in cancelled.items() if ok]
    assert [j for j in won if final[j] is not Status.CANCELLED] == []  # 0 completed after
    assert [j for j in ids if found[j].status is Status.IN_PROGRESS] == []
    assert [j for j in ids if found[j].finished_at is None] == []
    assert {final[j] for j in ids} <= {Status.CANCELLED, Status.COMPLETED}
    assert [j for j in won if found[j].started_at and found[j].cancel_observed_at is None] == []
    assert [j for j in ids if found[j].started_at is None and ran(j)] == []
    print(
        f"{len(ids)} jobs, {len(cancelled)} cancels ({len(won)} True), "
        f"{sum(1 for j in won if found[j].started_at)} while running, "
        f"{sum(1 for s in final.values() if s is Status.COMPLETED)} completed"
    )
    return final
