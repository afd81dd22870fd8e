import threading

import pytest

from dbcancel import Cancelled, Status


def test_run_cancel_wait(db):
    jobs = db.jobs()
    job = db.add()
    started = threading.Event()
    seen = []

    def worker():
        with jobs.run(job) as cp:
            started.set()
            while True:
                cp()
                seen.append(1)

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(10)
    assert jobs.cancel(job, reason="user deleted")
    assert jobs.wait(job, timeout=10) is Status.CANCELLED
    t.join(10)
    row = db.row(job)
    assert row.status is Status.CANCELLED
    assert row.finished_at is not None and row.cancel_reason == "user deleted"
    with pytest.raises(Cancelled):
        raise Cancelled(job)
