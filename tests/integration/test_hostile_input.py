"""Hostile input: filters that must never reach another owner's job, ids out of range.

Databases convert silently where Python would not: MySQL/MariaDB compare a string
column with a number by converting the string (every non-numeric string equals 0), and
their default ``_ci`` collations find 'ALICE', 'alice ' and 'àlice' equal to 'alice'.
An ownership filter built from a request value must compare exactly, on every database,
or refuse the value before anything is sent. Every case compares the whole table before
and after the call.
"""

from __future__ import annotations

import decimal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, event, select, text, update

from dbcancel import JobNotFound, Jobs, Status
from tests.models import Analysis

from .test_bad_input import OPS, _call, table_state

TABLE = Analysis.__table__

# Owners that a case-insensitive, accent-insensitive or PAD SPACE comparison confuses
# with one another, plus strings MySQL turns into numbers.
OWNERS = ["alice", "ALICE", "Alice", "alice ", "àlice", "bob", "0", "1", "", " "]

# Every JSON-ish type a request could hand over, and the look-alikes of the owners.
filter_values = st.one_of(
    st.sampled_from(OWNERS),
    st.sampled_from(OWNERS).map(str.upper),
    st.sampled_from(OWNERS).map(lambda s: s + " "),
    st.text(alphabet="aAàlicebo 01", max_size=7),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.binary(max_size=6),
    st.lists(st.sampled_from(OWNERS), max_size=2),
    st.dictionaries(st.sampled_from(["user_id"]), st.sampled_from(OWNERS), max_size=1),
)


def _owned_jobs(db: Any) -> dict[int, str]:
    """One pending job per owner, in one session: id -> owner."""
    with db.sessions.begin() as s:
        rows = [Analysis(user_id=owner, session_id="hostile") for owner in OWNERS]
        s.add_all(rows)
        s.flush()
        return {row.id: row.user_id for row in rows}


def _reset(engine: Engine, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id.in_(ids))
            .values(status=Status.PENDING, cancel_requested_at=None, finished_at=None)
        )


def _cancelled(engine: Engine, ids: list[int]) -> set[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(TABLE.c.id).where(TABLE.c.id.in_(ids), TABLE.c.status == Status.CANCELLED.value)
        )
        return set(rows.scalars())


@pytest.fixture
def loose_engine(db: Any) -> Iterator[Engine]:
    """An engine whose sessions run with ``sql_mode=''``: MariaDB then converts strings
    to numbers in comparisons without even a warning turned error."""
    engine = create_engine(db.url)

    @event.listens_for(engine, "connect")
    def loose(dbapi_conn: Any, record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = ''")

    yield engine
    engine.dispose()


MARIADB_ONLY = pytest.mark.parametrize(
    "database", [pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True
)


@MARIADB_ONLY
def test_the_mariadb_column_confuses_the_owners(db, loose_engine):
    """The properties below can fail only if the database itself confuses the owners."""
    with loose_engine.connect() as conn:
        collation = conn.execute(
            text(
                "SELECT collation_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = 'analysis' "
                "AND column_name = 'user_id'"
            )
        ).scalar_one()
        same = conn.execute(text("SELECT 'ALICE' = 'alice', 'alice ' = 'alice', 'àlice' = 'alice'"))
        assert collation.endswith("_ci")
        assert tuple(same.one()) == (1, 1, 1)
        assert conn.execute(text("SELECT 'alice' = 0")).scalar_one() == 1


def check_filter(db: Any, engine: Engine, value: Any, target: int) -> None:
    """cancel(where=) and cancel_where() with ``user_id=value`` change exactly the jobs
    whose owner is that very string, or refuse the value and change nothing."""
    jobs = Jobs(engine, Analysis, interval=0.05)
    owners = _owned_jobs(db)
    ids = sorted(owners)
    try:
        exact = {i for i, owner in owners.items() if type(value) is str and owner == value}
        job = ids[target]
        before = table_state(db)
        if type(value) is not str:
            with pytest.raises(TypeError, match="user_id"):
                jobs.cancel(job, where={"user_id": value})
            with pytest.raises(TypeError, match="user_id"):
                jobs.cancel_where(user_id=value, session_id="hostile")
            with pytest.raises(TypeError, match="user_id"):
                jobs.run(job, where={"user_id": value})
            assert table_state(db) == before
            return
        if job in exact:
            assert jobs.cancel(job, where={"user_id": value}) is True
        else:
            with pytest.raises(JobNotFound):
                jobs.cancel(job, where={"user_id": value})
        assert _cancelled(engine, ids) == exact & {job}
        _reset(engine, ids)
        assert jobs.cancel_where(user_id=value, session_id="hostile") == len(exact)
        assert _cancelled(engine, ids) == exact
    finally:
        with db.engine.begin() as conn:
            conn.execute(TABLE.delete().where(TABLE.c.id.in_(ids)))


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(value=filter_values, target=st.sampled_from(range(len(OWNERS))))
def test_a_filter_never_reaches_another_owners_job(db, value, target):
    check_filter(db, db.engine, value, target)


@MARIADB_ONLY
@PROPERTY
@given(value=filter_values, target=st.sampled_from(range(len(OWNERS))))
def test_a_filter_never_reaches_another_owners_job_with_empty_sql_mode(
    db, loose_engine, value, target
):
    check_filter(db, loose_engine, value, target)


# -- keys ----------------------------------------------------------------------------------

BAD_KEYS = [1, 0, True, False, 1.0, None, b"user_id", ("user_id",), TABLE.c.user_id]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
@pytest.mark.parametrize("op", ["cancel", "run"])
def test_filter_keys_must_be_column_names(db, key, op):
    """A column collection also answers to positions: {0: job_id} would select ``id``."""
    jobs = db.jobs()
    job = db.add()
    before = table_state(db)
    with pytest.raises(TypeError) as info:
        _call(jobs, op, job, where={key: job})
    assert repr(key) in str(info.value)
    assert "Analysis" in str(info.value)
    assert "nothing was changed" in str(info.value)
    assert table_state(db) == before
    assert jobs.active() == ()


@pytest.mark.parametrize("where", [[("user_id", "alice")], "user_id=alice", 42], ids=repr)
def test_where_must_be_a_mapping(db, where):
    jobs = db.jobs()
    job = db.add()
    before = table_state(db)
    for op in ("cancel", "run"):
        with pytest.raises(TypeError, match="mapping"):
            _call(jobs, op, job, where=where)
    assert table_state(db) == before


# -- values --------------------------------------------------------------------------------

WRONG_VALUES = [
    0,
    1,
    -1,
    1.0,
    True,
    False,
    None,
    b"alice",
    ["alice"],
    {"user_id": "alice"},
    decimal.Decimal(0),
    uuid.UUID(int=0),
]


@pytest.mark.parametrize("value", WRONG_VALUES, ids=repr)
def test_filter_values_must_have_the_columns_type(db, value):
    jobs = db.jobs()
    job = db.add(user_id="alice")
    db.add(user_id="bob")
    before = table_state(db)
    for call in (
        lambda: jobs.cancel(job, where={"user_id": value}),
        lambda: jobs.cancel_where(user_id=value),
        lambda: _call(jobs, "run", job, where={"user_id": value}),
    ):
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert "Analysis.user_id holds str" in message
        assert repr(value) in message
        assert "Nothing was changed" in message
    assert table_state(db) == before


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**40])
def test_filter_values_out_of_the_columns_range_match_nothing(db, value):
    jobs = db.jobs()
    job = db.add()
    before = table_state(db)
    with pytest.raises(JobNotFound):
        jobs.cancel(job, where={"id": value})
    with pytest.raises(JobNotFound):
        _call(jobs, "run", job, where={"id": value})
    assert jobs.cancel_where(id=value) == 0
    assert table_state(db) == before


# -- ids -----------------------------------------------------------------------------------

OUT_OF_RANGE = [2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**40]


@pytest.mark.parametrize("job_id", OUT_OF_RANGE)
@pytest.mark.parametrize("op", OPS)
def test_ids_out_of_range_are_not_found(db, op, job_id):
    """A driver error here (DataError, OverflowError) would be a 500 in a web view."""
    jobs = db.jobs()
    db.add()
    before = table_state(db)
    with pytest.raises(JobNotFound) as info:
        _call(jobs, op, job_id)
    assert info.value.job_id == job_id
    with pytest.raises(JobNotFound):
        _call(jobs, op, job_id, **({} if op in ("status", "wait") else {"where": {"id": 1}}))
    assert table_state(db) == before
    assert jobs.active() == ()


def test_ids_at_the_edges_of_the_range_are_looked_up(db):
    """The bounds themselves are valid ids: they reach the database and are not found."""
    jobs = db.jobs()
    db.add()
    top = 2**63 - 1 if db.name == "sqlite" else 2**31 - 1
    for job_id in (top, -top - 1, 0, -1):
        with pytest.raises(JobNotFound):
            jobs.status(job_id)
