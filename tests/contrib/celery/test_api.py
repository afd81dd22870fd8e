"""dbcancel.contrib.celery without a broker: its checks, its signals, eager tasks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from celery import Celery, signals
from sqlalchemy import create_engine, delete

from dbcancel import Checkpoint, Status
from dbcancel.contrib.celery import SHUTDOWN_REASON, CeleryJobs, JobNotRunnable
from tests.conftest import Database
from tests.models import Analysis


def test_import_without_celery_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "celery" or name.startswith("celery."):
                    raise ImportError("No module named 'celery'")
        sys.meta_path.insert(0, Block())
        try:
            import dbcancel.contrib.celery
        except ImportError as err:
            print(err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "pip install 'dbcancel[celery]'" in out


def test_it_checks_its_arguments() -> None:
    app = Celery("checks")
    engine = create_engine("sqlite://")
    with pytest.raises(TypeError, match="Engine"):
        CeleryJobs(app, "sqlite://", Analysis)
    with pytest.raises(ValueError, match="on_shutdown"):
        CeleryJobs(app, engine, Analysis, on_shutdown="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        CeleryJobs(app, engine, Analysis, interval=0)


def test_signals_are_connected_once_per_instance() -> None:
    before = len(signals.worker_process_init.receivers)
    before_down = len(signals.worker_shutting_down.receivers)
    before_revoked = len(signals.task_revoked.receivers)
    cj = CeleryJobs(Celery("signals"), create_engine("sqlite://"), Analysis)
    for name in ("one", "two", "three"):
        cj.task(name=f"signals.{name}")(lambda cp, job_id: None)
    assert len(signals.worker_process_init.receivers) == before + 1
    assert len(signals.worker_shutting_down.receivers) == before_down + 1
    assert len(signals.task_revoked.receivers) == before_revoked + 1
    assert cj.task_names == {"signals.one", "signals.two", "signals.three"}
    assert cj.on_shutdown == "cancel"
    assert SHUTDOWN_REASON == "worker shutdown"


def test_eager_tasks_without_a_result_backend(db: Database) -> None:
    app = Celery("eager")
    cj = CeleryJobs(app, db.engine, Analysis, interval=0.05)
    ran: list[int] = []

    @cj.task(name="eager.analyse")
    def analyse(cp: Checkpoint, job_id: int, n: int) -> int:
        ran.append(job_id)
        cp()
        return n

    done, cancelled = db.add(), db.add()
    assert analyse.apply((done, 3)).get() == 3
    assert cj.jobs.status(done) is Status.COMPLETED
    assert cj.jobs.cancel(cancelled) is True
    result = analyse.apply((cancelled, 3))
    assert result.state == "IGNORED"
    again = analyse.apply((done, 3))
    assert again.state == "IGNORED"
    assert ran == [done]


def test_job_not_runnable_survives_celery_serialisation() -> None:
    exc = JobNotRunnable("Analysis", 7, "failed")
    rebuilt = JobNotRunnable(*exc.args)
    assert (rebuilt.model, rebuilt.job_id, rebuilt.status) == ("Analysis", 7, "failed")
    assert "runs at most once" in str(rebuilt)


def test_a_row_deleted_after_the_cancel_is_revoked_not_failed(db: Database) -> None:
    app = Celery("deleted")
    cj = CeleryJobs(app, db.engine, Analysis, interval=0.05)

    @cj.task(name="deleted.analyse")
    def analyse(cp: Checkpoint, job_id: int) -> None:
        cj.jobs.cancel(job_id, reason="user deleted it")
        with db.engine.begin() as conn:  # the request deletes as soon as the job stops
            conn.execute(delete(Analysis).where(Analysis.id == job_id))
        cp()

    job_id = db.add()
    assert analyse.apply((job_id,)).state == "IGNORED"
    assert analyse.apply((job_id,)).state == "IGNORED"  # a delivery of a deleted job
