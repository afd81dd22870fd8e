"""Our own one-statement writes are retried when the database picks them as deadlock victims."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import text, update

from dbcancel import Status
from tests.models import Analysis


def _waiting_on_lock(db, pid: int) -> bool:
    with db.engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
                ),
                {"pid": pid},
            ).scalar()
        )


@pytest.mark.parametrize(
    "database", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)
def test_cancel_where_survives_being_a_deadlock_victim(db, caplog):
    """A transaction locks job 2 then job 1; cancel_where locks job 1 then waits for job 2.

    PostgreSQL's detector runs in the backend that has waited deadlock_timeout first,
    which is cancel_where's, and aborts it. Without the retry cancel_where raises; with it,
    it runs again once the other transaction has committed, and cancels both jobs.
    """
    assert db.name == "postgresql"  # its deadlock detector makes the victim deterministic
    jobs = db.jobs()
    first, second = db.add(session_id="s"), db.add(session_id="s")
    table = Analysis.__table__
    outcome: dict[str, object] = {}
    caplog.set_level(logging.INFO, logger="dbcancel")

    # cancel_where's scan locks the rows in their physical order, which after earlier
    # tests' deletes need not be the order of their ids.
    with db.engine.connect() as conn:
        first, second = conn.execute(
            text("SELECT id FROM analysis WHERE id IN (:a, :b) ORDER BY ctid"),
            {"a": first, "b": second},
        ).scalars()
    with db.engine.connect() as other:
        other.execute(update(table).where(table.c.id == second).values(user_id="bob"))
        holder = other.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def cancel() -> None:
            try:
                outcome["count"] = jobs.cancel_where(session_id="s")
            except BaseException as exc:
                outcome["error"] = exc

        canceller = threading.Thread(target=cancel, daemon=True)
        canceller.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_lock(db, holder) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a server-side condition that has no event
        assert _waiting_on_lock(db, holder), "cancel_where never waited for the row lock"
        # Closes the cycle; blocks until the detector aborts cancel_where's transaction.
        other.execute(update(table).where(table.c.id == first).values(user_id="bob"))
        other.commit()
    canceller.join(30)
    assert not canceller.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["count"] == 2
    assert jobs.status(first) is Status.CANCELLED
    assert jobs.status(second) is Status.CANCELLED
    assert any("retrying" in r.getMessage() for r in caplog.records)
