"""The one retry policy of the backends, :func:`dbcancel.backend.run_retried`, on its own.

Both shipped backends retry through it (their behaviour against real servers is in
tests/integration/test_deadlock_retry.py and the fault tests); here its counting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from dbcancel import backend
from dbcancel.backend import RETRIES, Faults, is_transient_error, run_retried


class Dead(Exception):
    pass


class Deadlock(Exception):
    pass


FAULTS = Faults(
    errors=(Dead, Deadlock),
    is_dead=lambda err: isinstance(err, Dead),
    is_transient=lambda err: isinstance(err, Deadlock),
)


@pytest.fixture(autouse=True)
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the policy takes, recorded instead of slept (in this module only)."""
    slept: list[float] = []
    monkeypatch.setattr(backend, "time", SimpleNamespace(sleep=slept.append))
    return slept


def failing(*errors: BaseException) -> tuple[Callable[[], str], list[int]]:
    """Work that raises ``errors`` one per try, then returns "done"."""
    tries: list[int] = []

    def work() -> str:
        tries.append(1)
        if len(tries) <= len(errors):
            raise errors[len(tries) - 1]
        return "done"

    return work, tries


def test_a_write_retries_deadlocks_up_to_the_limit_with_growing_pauses(pauses, caplog):
    caplog.set_level(logging.INFO, logger="dbcancel")
    work, tries = failing(*[Deadlock(f"d{i}") for i in range(RETRIES - 1)])
    assert run_retried(work, FAULTS, label="Analysis") == "done"
    assert len(tries) == RETRIES
    assert len(pauses) == RETRIES - 1
    assert all(0.001 * n <= p <= 0.01 * n for n, p in enumerate(pauses, 1))
    assert "dbcancel: d0 on Analysis, retrying" in caplog.messages

    work, tries = failing(*[Deadlock("again")] * RETRIES)
    with pytest.raises(Deadlock):
        run_retried(work, FAULTS, label="Analysis")
    assert len(tries) == RETRIES


def test_a_dead_connection_is_retried_once_without_a_pause(pauses, caplog):
    caplog.set_level(logging.INFO, logger="dbcancel")
    work, tries = failing(Dead("gone"))
    assert run_retried(work, FAULTS, label="Analysis") == "done"
    assert (len(tries), pauses) == (2, [])
    assert "dbcancel: gone on Analysis, reconnecting" in caplog.messages
    work, tries = failing(Dead("gone"), Dead("gone again"))
    with pytest.raises(Dead, match="gone again"):
        run_retried(work, FAULTS, label="Analysis")
    assert len(tries) == 2


def test_a_read_is_retried_only_after_a_dead_connection(caplog):
    caplog.set_level(logging.INFO, logger="dbcancel")
    work, tries = failing(Dead("gone"))
    assert run_retried(work, FAULTS, label="Analysis", write=False) == "done"
    assert "dbcancel: gone on Analysis, reading again" in caplog.messages
    work, tries = failing(Deadlock("locked"))
    with pytest.raises(Deadlock):
        run_retried(work, FAULTS, label="Analysis", write=False)
    assert len(tries) == 1


def test_other_errors_propagate_at_once():
    work, tries = failing(ValueError("bad"))
    with pytest.raises(ValueError):
        run_retried(work, FAULTS, label="Analysis")
    assert len(tries) == 1


class DriverError(Exception):
    def __init__(self, *args: object, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (DriverError("deadlock", sqlstate="40P01"), True),
        (DriverError("serialization", sqlstate="40001"), True),
        (DriverError("unique", sqlstate="23505"), False),
        (DriverError(1213, "Deadlock found"), True),
        (DriverError(1205, "Lock wait timeout exceeded"), True),
        (DriverError(1062, "Duplicate entry"), False),
        (None, False),
    ],
)
def test_transient_driver_errors(error, transient):
    assert is_transient_error(error) is transient
