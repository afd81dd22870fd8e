"""``manage.py dbcancel list|status|cancel|reap``."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from dbcancel import Status
from dbcancel.contrib.django.management.commands.dbcancel import Command

from .testapp.models import Analysis

MODEL = ("--model", "testapp.Analysis")


def run(alias: str, *args: str) -> str:
    out = io.StringIO()
    call_command("dbcancel", *args, *MODEL, "--database", alias, stdout=out)
    return out.getvalue()


def test_status(alias, add, jobs):
    job = add()
    assert run(alias, "status", str(job)) == f"testapp_analysis {job}: pending\n"
    with jobs.run(job):
        assert run(alias, "status", str(job)).startswith(
            f"testapp_analysis {job}: in_progress\n  started:   "
        )
    lines = run(alias, "status", str(job)).splitlines()
    assert lines[0] == f"testapp_analysis {job}: completed"
    assert [line.split(":")[0] for line in lines[1:]] == ["  started", "  finished", "  worker"]


def test_cancel(alias, add, jobs, row):
    pending, running, done = add(), add(), add()
    with jobs.run(done):
        pass
    assert run(alias, "cancel", str(pending), "--reason", "ops said so") == (
        f"testapp_analysis {pending}: cancelled\n"
    )
    assert row(pending).cancel_reason == "ops said so"
    assert run(alias, "cancel", str(pending)) == f"testapp_analysis {pending}: already cancelled\n"
    with jobs.run(running) as cp:
        out = run(alias, "cancel", str(running))
        assert cp.cancelled
    assert out == (
        f"testapp_analysis {running}: cancelled (it was in progress: its worker stops at its next "
        "checkpoint)\n"
    )
    message = f"testapp_analysis {done}: not cancelled: it is completed"
    with pytest.raises(CommandError, match=message) as e:
        run(alias, "cancel", str(done))
    assert e.value.returncode == 1
    assert row(done).status == Status.COMPLETED


def test_list(alias, add, jobs):
    assert run(alias, "list") == "no pending or in_progress jobs in testapp_analysis\n"
    pending, done = add(), add()
    with jobs.run(done):
        pass
    jobs.cancel(pending, reason="a reason")
    live = add()
    lines = run(alias, "list").splitlines()
    assert lines[0].split() == ["id", "status", "started", "finished", "worker", "reason/error"]
    assert [line.split()[:2] for line in lines[2:]] == [[str(live), "pending"]]
    every = run(alias, "list", "--all").splitlines()
    assert [line.split()[:2] for line in every[2:]] == [
        [str(pending), "cancelled"],
        [str(done), "completed"],
        [str(live), "pending"],
    ]
    assert every[2].endswith("a reason")
    assert every[3].split()[2].endswith("Z")  # started_at, in UTC


def test_unknown_job_and_bad_id(alias, add):
    missing = add() + 1000
    for args in (("status", str(missing)), ("cancel", str(missing))):
        with pytest.raises(CommandError, match="not found") as e:
            run(alias, *args)
        assert e.value.returncode == 2
    with pytest.raises(CommandError, match="'seven' is not one") as e:
        run(alias, "status", "seven")
    assert e.value.returncode == 2


def stale(alias, job, *, seconds, **values):
    """Give ``job`` a heartbeat ``seconds`` old (and ``values``), as a dead worker leaves it."""
    beat = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    Analysis.objects.using(alias).filter(pk=job).update(
        started_at=beat, heartbeat_at=beat, **values
    )


def snapshot(alias):
    """Every job row, to show that a refused command changed nothing."""
    return list(Analysis.objects.using(alias).order_by("pk").values_list())


def test_reap(alias, add, jobs, row):
    lost = add()
    stale(alias, lost, seconds=3600, status=Status.IN_PROGRESS)
    unstopped = add()
    stale(alias, unstopped, seconds=3600, status=Status.CANCELLED, cancel_reason="user left")
    alive = add()
    stale(alias, alive, seconds=5, status=Status.IN_PROGRESS)
    before = snapshot(alias)

    assert run(alias, "reap", "--stale-after", "30") == (
        "reaped 2 jobs of testapp_analysis (no heartbeat for 30s)\n"
    )
    failed = row(lost)
    assert (failed.status, failed.error) == (Status.FAILED, "worker lost")
    assert failed.finished_at is not None
    cancelled = row(unstopped)
    assert (cancelled.status, cancelled.error) == (Status.CANCELLED, None)
    assert cancelled.cancel_reason == "user left"
    assert cancelled.finished_at is not None
    assert [r for r in snapshot(alias) if r[0] == alive] == [r for r in before if r[0] == alive]
    # wait() no longer waits for the dead workers.
    assert jobs.wait(lost, timeout=1) is Status.FAILED
    assert jobs.wait(unstopped, timeout=1) is Status.CANCELLED

    assert run(alias, "reap", "--stale-after", "2.5") == (
        "reaped 1 job of testapp_analysis (no heartbeat for 2.5s)\n"
    )
    assert row(alive).status == Status.FAILED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: --stale-after"),
        (["--stale-after", "0"], "expected a number of seconds > 0, got 0"),
        (["--stale-after", "-1"], "expected a number of seconds > 0, got -1"),
        (["--stale-after", "nan"], "expected a number of seconds > 0, got nan"),
        (["--stale-after", "soon"], "expected a number of seconds, got 'soon'"),
    ],
)
def test_reap_needs_a_positive_stale_after(alias, add, capsys, args, message):
    job = add()
    stale(alias, job, seconds=3600, status=Status.IN_PROGRESS)
    before = snapshot(alias)

    with pytest.raises(CommandError, match=message):
        run(alias, "reap", *args)
    # From the shell: a usage error, exit status 2.
    with pytest.raises(SystemExit) as e:
        Command().run_from_argv(
            ["manage.py", "dbcancel", "reap", *args, *MODEL, "--database", alias]
        )
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert snapshot(alias) == before


def test_model_and_database_options():
    with pytest.raises(CommandError, match=r"name the job model with --model.*testapp.Analysis"):
        call_command("dbcancel", "list")
    with pytest.raises(CommandError, match="not an installed model"):
        call_command("dbcancel", "list", "--model", "testapp.Nope")
    with pytest.raises(CommandError, match="lacks the field"):
        call_command("dbcancel", "list", "--model", "testapp.Result")
    with pytest.raises(CommandError, match="not a database alias"):
        call_command("dbcancel", "list", *MODEL, "--database", "nowhere")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_options_before_the_subcommand_and_the_default_model():
    out = io.StringIO()
    call_command("dbcancel", "--model", "testapp.Analysis", "list", stdout=out)
    assert out.getvalue() == "no pending or in_progress jobs in testapp_analysis\n"
    with override_settings(DBCANCEL_DEFAULT_MODEL="testapp.Renamed"):
        call_command("dbcancel", "list", stdout=out)
    assert out.getvalue().endswith("no pending or in_progress jobs in dbcancel_renamed_jobs\n")
