"""Hostile input through DjangoJobs: the same rules as the SQLAlchemy side.

Filter values are checked against the field's type before anything is sent, strings
are compared exactly whatever the collation (MariaDB's default is case- and
accent-insensitive and ignores trailing spaces), keys must be field names given as
strings, and ids out of the key's range are simply not found.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbcancel import JobNotFound, Status

from .testapp.models import Analysis

OWNERS = ["alice", "ALICE", "alice ", "àlice", "bob", "0", ""]
OUT_OF_RANGE = [2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**40]

filter_values = st.one_of(
    st.sampled_from(OWNERS),
    st.sampled_from(OWNERS).map(str.upper),
    st.text(alphabet="aAàlicebo 0", max_size=6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
)


def state(alias: str) -> list[dict[str, Any]]:
    """Every row of the job table, every field."""
    return list(Analysis.objects.using(alias).order_by("pk").values())


def run(jobs: Any, job_id: Any, **kw: Any) -> None:
    with jobs.run(job_id, **kw) as cp:
        cp()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=filter_values, target=st.sampled_from(range(len(OWNERS))))
def test_a_filter_never_reaches_another_owners_job(alias, jobs, value, target):
    manager = Analysis.objects.using(alias)
    ids = [manager.create(user_id=owner, session_id="hostile").pk for owner in OWNERS]
    try:
        owners = dict(zip(ids, OWNERS, strict=True))
        exact = {i for i, owner in owners.items() if type(value) is str and owner == value}
        job = ids[target]
        before = state(alias)
        if type(value) is not str:
            with pytest.raises(TypeError, match="user_id"):
                jobs.cancel(job, where={"user_id": value})
            with pytest.raises(TypeError, match="user_id"):
                jobs.cancel_where(user_id=value, session_id="hostile")
            assert state(alias) == before
            return
        if job in exact:
            assert jobs.cancel(job, where={"user_id": value}) is True
        else:
            with pytest.raises(JobNotFound):
                jobs.cancel(job, where={"user_id": value})
        cancelled = set(
            manager.filter(pk__in=ids, status=Status.CANCELLED.value).values_list("pk", flat=True)
        )
        assert cancelled == exact & {job}
        manager.filter(pk__in=ids).update(status=Status.PENDING.value, finished_at=None)
        assert jobs.cancel_where(user_id=value, session_id="hostile") == len(exact)
        cancelled = set(
            manager.filter(pk__in=ids, status=Status.CANCELLED.value).values_list("pk", flat=True)
        )
        assert cancelled == exact
    finally:
        manager.filter(pk__in=ids).delete()


@pytest.mark.parametrize("key", [1, 0, True, 1.0, None, b"user_id"], ids=repr)
def test_filter_keys_must_be_field_names(alias, jobs, add, key):
    job = add()
    before = state(alias)
    for call in (
        lambda: jobs.cancel(job, where={key: job}),
        lambda: run(jobs, job, where={key: job}),
    ):
        with pytest.raises(TypeError) as info:
            call()
        assert repr(key) in str(info.value)
        assert "Analysis" in str(info.value)
    assert state(alias) == before


@pytest.mark.parametrize("value", [0, 1.0, True, None, b"alice", ["alice"]], ids=repr)
def test_filter_values_must_have_the_fields_type(alias, jobs, add, value):
    job = add(user_id="alice")
    add(user_id="bob")
    before = state(alias)
    for call in (
        lambda: jobs.cancel(job, where={"user_id": value}),
        lambda: jobs.cancel_where(user_id=value),
        lambda: run(jobs, job, where={"user_id": value}),
    ):
        with pytest.raises(TypeError, match=r"Analysis\.user_id holds str"):
            call()
    assert state(alias) == before


@pytest.mark.parametrize("job_id", OUT_OF_RANGE)
def test_ids_out_of_range_are_not_found(alias, jobs, add, job_id):
    add()
    before = state(alias)
    for call in (
        lambda: jobs.status(job_id),
        lambda: jobs.cancel(job_id),
        lambda: jobs.cancel(job_id, where={"user_id": "alice"}),
        lambda: jobs.wait(job_id, timeout=1),
        lambda: run(jobs, job_id),
    ):
        with pytest.raises(JobNotFound):
            call()
    assert jobs.cancel_where(pk=job_id) == 0
    assert state(alias) == before
