"""``dbcancel.migrations`` on real SQLite, PostgreSQL and MariaDB tables.

Each test creates its own uniquely named tables in the session's database and drives
Alembic through ``MigrationContext`` and ``Operations`` directly, as a migration script
would, without a migration directory.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import alembic.op
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import CancellableMixin, Cancelled, Jobs, Status
from dbcancel._sqla import SQLAlchemyBackend
from dbcancel.migrations import (
    AddCancellationOp,
    DropCancellationOp,
    MigrationError,
    add_cancellation,
    drop_cancellation,
    upgrade_cancellation,
)
from dbcancel.models import WORKER_TABLE, UTCDateTime, worker_table
from tests.conftest import Database

ROWS = [
    {"id": 1, "user_id": "alice", "session_id": "s1"},
    {"id": 2, "user_id": "bob", "session_id": None},
    {"id": 3, "user_id": "carol", "session_id": "s3"},
]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def own_columns(name: str) -> list[Any]:
    """The job table's own columns and constraints, before dbcancel."""
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), index=True),
        sa.CheckConstraint("user_id <> ''", name=f"ck_{name}_user"),
    ]


def legacy_table(db: Database, name: str, *extra: Any, rows: list[dict[str, Any]] = ROWS) -> None:
    """Create the app's job table as it was before dbcancel, with rows."""
    table = sa.Table(name, sa.MetaData(), *own_columns(name), *extra)
    table.create(db.engine)
    if rows:
        with db.engine.begin() as conn:
            conn.execute(table.insert(), rows)


def model_for(name: str) -> Any:
    """The equivalent model with the mixin, as the app declares it after the migration."""

    class Base(DeclarativeBase):
        pass

    class Job(CancellableMixin, Base):
        __tablename__ = name
        __table_args__ = (sa.CheckConstraint("user_id <> ''", name=f"ck_{name}_user"),)
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[str] = mapped_column(sa.String(64))
        session_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)

    return Job


@contextmanager
def migrate(db: Database) -> Iterator[Operations]:
    """An Alembic ``op`` on one connection, committed at the end (rolled back on error)."""
    with db.engine.connect() as conn:
        ops = Operations(MigrationContext.configure(conn))
        try:
            yield ops
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


def schema(db: Database, name: str) -> dict[str, Any]:
    """The table's shape, with the table's name replaced by ``T`` in object names."""
    inspector = sa.inspect(db.engine)
    dialect = db.engine.dialect

    def norm(obj_name: str | None) -> str | None:
        return None if obj_name is None else obj_name.replace(name, "T")

    return {
        "columns": [
            (
                c["name"],
                c["type"].compile(dialect=dialect),
                c["nullable"],
                None if c.get("default") is None else str(c["default"]),
            )
            for c in inspector.get_columns(name)
        ],
        "pk": inspector.get_pk_constraint(name)["constrained_columns"],
        "indexes": sorted(
            (norm(i["name"]), tuple(i["column_names"]), bool(i["unique"]))
            for i in inspector.get_indexes(name)
        ),
        "checks": sorted(
            (norm(c["name"]), str(c["sqltext"])) for c in inspector.get_check_constraints(name)
        ),
    }


def rows(db: Database, name: str, *columns: str) -> list[tuple[Any, ...]]:
    table = sa.table(name, *(sa.column(c) for c in columns))
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.id))]


@pytest.fixture
def names(db: Database) -> Iterator[list[str]]:
    """Tables a test creates, dropped after it."""
    created: list[str] = []
    yield created
    inspector = sa.inspect(db.engine)
    with db.engine.begin() as conn:
        for name in created:
            if inspector.has_table(name):
                conn.execute(sa.text(f"DROP TABLE {name}"))


# -- the round trip ---------------------------------------------------------------------


def test_add_then_drop_round_trips_schema_and_data(db: Database, names: list[str]) -> None:
    name, ref = unique("mig"), unique("ref")
    names += [name, ref]
    legacy_table(db, name)
    before = schema(db, name)

    with migrate(db) as ops:
        add_cancellation(ops, name)

    # The upgraded table is what create_all() makes of the model with the mixin.
    Model = model_for(name)
    reference = model_for(ref).__table__
    reference.create(db.engine)
    assert schema(db, name) == schema(db, ref)
    after = schema(db, name)
    assert ("ix_T_status", ("status",), False) in after["indexes"]
    assert "ck_T_status" in dict(after["checks"])

    # Rows kept, now pending jobs with nothing else set.
    assert rows(db, name, "id", "user_id", "session_id", "status", "finished_at", "error") == [
        (1, "alice", "s1", "pending", None, None),
        (2, "bob", None, "pending", None, None),
        (3, "carol", "s3", "pending", None, None),
    ]

    # Jobs works on it.
    jobs = Jobs(db.engine, Model, interval=0.05)
    with jobs.run(1) as cp:
        cp()
    assert jobs.status(1) is Status.COMPLETED
    assert jobs.cancel(2, reason="session deleted") is True
    assert jobs.wait(2, timeout=5) is Status.CANCELLED
    with jobs.run(3) as cp:
        jobs.cancel(3)
        with pytest.raises(Cancelled):
            cp()
    assert jobs.wait(3, timeout=5) is Status.CANCELLED

    with migrate(db) as ops:
        drop_cancellation(ops, name)

    assert schema(db, name) == before
    assert rows(db, name, "id", "user_id", "session_id") == [tuple(r.values()) for r in ROWS]


def test_adding_twice_is_refused_and_changes_nothing(db: Database, names: list[str]) -> None:
    name = unique("mig")
    names.append(name)
    legacy_table(db, name)
    with migrate(db) as ops:
        add_cancellation(ops, name)
    upgraded = schema(db, name)

    with pytest.raises(MigrationError) as err, migrate(db) as ops:
        add_cancellation(ops, name)
    message = str(err.value)
    assert name in message
    assert "column status" in message
    assert "column error" in message
    assert f"constraint ck_{name}_status" in message
    assert f"index ix_{name}_status" in message
    assert "already run" in message
    assert "Nothing was changed" in message
    assert schema(db, name) == upgraded

    with migrate(db) as ops:
        drop_cancellation(ops, name)
    dropped = schema(db, name)
    with (
        pytest.raises(
            MigrationError,
            match=rf"{name} lacks column cancel_requested_at.*column status, .*has not run",
        ),
        migrate(db) as ops,
    ):
        drop_cancellation(ops, name)
    assert schema(db, name) == dropped


def test_partial_parts_and_missing_tables_are_refused(db: Database, names: list[str]) -> None:
    name = unique("mig")
    names.append(name)
    legacy_table(db, name, sa.Column("started_at", sa.DateTime))
    before = schema(db, name)
    with (
        pytest.raises(MigrationError, match=rf"{name} already has column started_at: rename"),
        migrate(db) as ops,
    ):
        add_cancellation(ops, name)
    assert schema(db, name) == before

    with pytest.raises(MigrationError, match=r"no table 'no_such_job_table'"), migrate(db) as ops:
        add_cancellation(ops, "no_such_job_table")
    with (
        pytest.raises(MigrationError, match=r"has no status column for existing_status"),
        migrate(db) as ops,
    ):
        add_cancellation(ops, name, existing_status=True)
    assert schema(db, name) == before


# -- the Alembic operations -------------------------------------------------------------


def test_registered_operations_and_their_reverse(db: Database, names: list[str]) -> None:
    name = unique("mig")
    names.append(name)
    legacy_table(db, name)
    before = schema(db, name)
    default_schema = sa.inspect(db.engine).default_schema_name

    def columns() -> list[str]:
        return [c[0] for c in schema(db, name)["columns"]]

    with migrate(db) as ops:
        ops.add_cancellation(name, schema=default_schema)  # type: ignore[attr-defined]
    assert columns()[3:] == [
        "cancel_requested_at",
        "cancel_reason",
        "cancel_observed_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "error",
        "worker_id",
        "status",
        "attempts",
    ]
    upgraded = schema(db, name)

    # As a migration script sees it: the module-level proxy alembic.op.
    with migrate(db) as ops, Operations.context(ops.migration_context):
        alembic.op.drop_cancellation(name)  # type: ignore[attr-defined]
    assert schema(db, name) == before

    forward = AddCancellationOp(name)
    assert isinstance(forward.reverse(), DropCancellationOp)
    assert repr(forward.reverse().reverse()) == f"AddCancellationOp({name!r})"
    with migrate(db) as ops:
        ops.invoke(DropCancellationOp(name).reverse())
    assert schema(db, name) == upgraded
    with migrate(db) as ops, Operations.context(ops.migration_context):
        drop_cancellation(alembic.op, name)
    assert schema(db, name) == before


# -- a status column of the app's own ---------------------------------------------------


def test_an_existing_status_column_is_kept_and_its_constraint_widened(
    db: Database, names: list[str]
) -> None:
    name = unique("mig")
    names.append(name)
    ck, ix = f"ck_{name}_status", f"ix_{name}_status"
    legacy_table(
        db,
        name,
        sa.Column("status", sa.String(20), nullable=False, server_default="queued"),
        sa.CheckConstraint("status IN ('queued', 'pending', 'done', 'it''s')", name=ck),
        sa.Index(ix, "status"),
        rows=[{**ROWS[0], "status": "queued"}, {**ROWS[1], "status": "done"}],
    )
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {name} (id, user_id, status) VALUES (3, 'c', 'pending')")
        )
    before = schema(db, name)

    # Without the flag: refused, with the way out in the message.
    with (
        pytest.raises(MigrationError, match=r"predates dbcancel: pass existing_status=True"),
        migrate(db) as ops,
    ):
        add_cancellation(ops, name)
    assert schema(db, name) == before

    with migrate(db) as ops:
        add_cancellation(ops, name, existing_status=True)
    after = schema(db, name)
    assert after["columns"][:4] == before["columns"][:4]  # status untouched
    assert [c[0] for c in after["columns"][4:]] == [
        "cancel_requested_at",
        "cancel_reason",
        "cancel_observed_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "error",
        "worker_id",
        "attempts",
    ]
    assert after["indexes"] == before["indexes"]
    assert rows(db, name, "id", "status") == [(1, "queued"), (2, "done"), (3, "pending")]

    # The widened constraint allows dbcancel's states and the app's values, nothing else.
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {name} (id, user_id, status) VALUES (4, 'd', 'in_progress')")
        )
        conn.execute(sa.text(f"INSERT INTO {name} (id, user_id, status) VALUES (5, 'e', 'it''s')"))
    with pytest.raises(sa.exc.DBAPIError), db.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {name} (id, user_id, status) VALUES (6, 'f', 'bogus')"))

    jobs = Jobs(db.engine, model_for(name), interval=0.05)
    assert jobs.cancel(3) is True
    assert jobs.status(3) is Status.CANCELLED

    # A downgrade that forgets the flag would drop the app's column: refused.
    upgraded = schema(db, name)
    with (
        pytest.raises(
            MigrationError, match=r"values dbcancel never writes \('done', \"it's\", 'queued'\)"
        ),
        migrate(db) as ops,
    ):
        drop_cancellation(ops, name)
    assert schema(db, name) == upgraded

    with migrate(db) as ops:
        drop_cancellation(ops, name, existing_status=True)
    final = schema(db, name)
    assert final["columns"] == before["columns"]
    assert final["indexes"] == before["indexes"]
    assert "ck_T_status" in dict(final["checks"])  # the wider constraint stays
    assert rows(db, name, "id", "status") == [
        (1, "queued"),
        (2, "done"),
        (3, "cancelled"),
        (4, "in_progress"),
        (5, "it's"),
    ]


def test_an_existing_status_column_without_room_is_refused(db: Database, names: list[str]) -> None:
    name = unique("mig")
    names.append(name)
    legacy_table(db, name, sa.Column("status", sa.String(8)))
    before = schema(db, name)
    with (
        pytest.raises(MigrationError, match=r"status is VARCHAR\(length=8\).*room for 11"),
        migrate(db) as ops,
    ):
        add_cancellation(ops, name, existing_status=True)
    assert schema(db, name) == before


# -- without a database -----------------------------------------------------------------


def offline(dialect: str) -> tuple[Operations, io.StringIO]:
    out = io.StringIO()
    context = MigrationContext.configure(
        dialect_name=dialect, opts={"as_sql": True, "output_buffer": out}
    )
    return Operations(context), out


def test_offline_mode_writes_the_statements_for_postgresql_and_mariadb() -> None:
    ops, out = offline("postgresql")
    ops.add_cancellation("analysis")  # type: ignore[attr-defined]
    ops.drop_cancellation("analysis")  # type: ignore[attr-defined]
    sql = out.getvalue()
    assert "ALTER TABLE analysis ADD COLUMN status VARCHAR(16) DEFAULT 'pending' NOT NULL" in sql
    assert "ADD COLUMN finished_at TIMESTAMP WITH TIME ZONE" in sql
    assert "CREATE INDEX ix_analysis_status ON analysis (status)" in sql
    assert "ADD CONSTRAINT ck_analysis_status CHECK (status IN ('pending'," in sql
    assert "ALTER TABLE analysis DROP CONSTRAINT ck_analysis_status" in sql
    assert "ALTER TABLE analysis DROP COLUMN error" in sql

    ops, out = offline("mysql")
    ops.add_cancellation("analysis")  # type: ignore[attr-defined]
    assert "ADD COLUMN finished_at DATETIME(6)" in out.getvalue()


def test_offline_mode_refuses_what_needs_the_database() -> None:
    ops, _ = offline("sqlite")
    with pytest.raises(MigrationError, match=r"offline \(--sql\) mode on SQLite"):
        ops.add_cancellation("analysis")  # type: ignore[attr-defined]
    ops, _ = offline("postgresql")
    with pytest.raises(MigrationError, match=r"existing_status=True\) cannot run in offline"):
        ops.drop_cancellation("analysis", existing_status=True)  # type: ignore[attr-defined]


def test_bad_table_names_are_refused() -> None:
    with pytest.raises(TypeError, match="table_name must be the name of a table"):
        AddCancellationOp("")


def test_importing_without_alembic_names_the_extra() -> None:
    script = "import sys; sys.modules['alembic'] = None; import dbcancel.migrations"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "pip install 'dbcancel[alembic]'" in proc.stderr


# -- upgrading a table made cancellable by an earlier dbcancel --------------------------


def test_upgrade_brings_an_earlier_table_up_to_the_model(db: Database, names: list[str]) -> None:
    """A table from dbcancel 0.1 (no cancel_observed_at, no worker_id) becomes what
    create_all() makes of the model today; its rows keep their data; running it again
    changes nothing."""
    name, ref = unique("old"), unique("ref")
    names += [name, ref]
    legacy_table(db, name)
    with migrate(db) as ops:
        add_cancellation(ops, name)
    with migrate(db) as ops:  # back to 0.1's shape
        if db.name == "sqlite":
            with ops.batch_alter_table(name) as batch:
                batch.drop_column("worker_id")
                batch.drop_column("cancel_observed_at")
        else:
            ops.drop_column(name, "worker_id")
            ops.drop_column(name, "cancel_observed_at")
        ops.execute(sa.text(f"UPDATE {name} SET status = 'completed' WHERE id = 1"))
    old = [c[0] for c in schema(db, name)["columns"]]
    assert "worker_id" not in old
    assert "cancel_observed_at" not in old

    with migrate(db) as ops:
        ops.upgrade_cancellation(name)  # type: ignore[attr-defined]
    reference = model_for(ref).__table__
    reference.create(db.engine)
    after = schema(db, name)
    assert sorted(after["columns"]) == sorted(schema(db, ref)["columns"])
    assert rows(db, name, "id", "status") == [(1, "completed"), (2, "pending"), (3, "pending")]
    assert sa.inspect(db.engine).has_table("dbcancel_worker")
    with migrate(db) as ops:
        upgrade_cancellation(ops, name)  # again: nothing to do
    assert schema(db, name) == after

    Model = model_for(name)
    jobs = Jobs(db.engine, Model, interval=0.05)
    with jobs.run(2):
        pass
    assert jobs.status(2) is Status.COMPLETED


def test_upgrade_refuses_a_table_that_was_never_made_cancellable(
    db: Database, names: list[str]
) -> None:
    name = unique("plain")
    names.append(name)
    legacy_table(db, name)
    before = schema(db, name)
    with (
        pytest.raises(MigrationError, match=r"no status column.*add_cancellation"),
        migrate(db) as ops,
    ):
        upgrade_cancellation(ops, name)
    assert schema(db, name) == before


# -- a worker table made before expires_at ----------------------------------------------


@pytest.fixture
def scratch(db: Database, tmp_path: Any) -> Iterator[sa.Engine]:
    """An engine on a new, empty schema (PostgreSQL), database (MariaDB) or file
    (SQLite) beside the session's: a worker table of its own. Dropped after."""
    name = f"dbcancel_{os.getpid()}_mig_{uuid.uuid4().hex[:6]}"
    if db.name == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / name}.db")
        yield engine
        engine.dispose()
        return
    url = sa.engine.make_url(db.url)
    if db.name == "postgresql":
        create, drop = f"CREATE SCHEMA {name}", f"DROP SCHEMA {name} CASCADE"
        url = url.update_query_dict({"options": f"-csearch_path={name}"})
    else:
        create, drop = f"CREATE DATABASE {name}", f"DROP DATABASE {name}"
        url = url.set(database=name)
    admin = db.engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(create))
    engine = sa.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(drop))


OTHER = "other-host:1:aa"
"""The worker row of another (made-up) process."""


def old_worker_table(engine: sa.Engine) -> sa.Table:
    """The worker table as a dbcancel without ``expires_at`` made it."""
    table = sa.Table(
        WORKER_TABLE,
        sa.MetaData(),
        sa.Column("id", sa.String(255)),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{WORKER_TABLE}"),
    )
    table.create(engine)
    return table


def worker_columns(engine: sa.Engine) -> list[tuple[str, str, bool]]:
    inspector = sa.inspect(engine)
    return [
        (c["name"], c["type"].compile(dialect=engine.dialect), c["nullable"])
        for c in inspector.get_columns(WORKER_TABLE)
    ]


def ops_on(engine: sa.Engine) -> Any:
    @contextmanager
    def migrate() -> Iterator[Operations]:
        with engine.begin() as conn:
            yield Operations(MigrationContext.configure(conn))

    return migrate()


def test_an_old_worker_table_keeps_jobs_running_and_upgrade_adds_expires_at(
    db: Database, scratch: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """New code on a worker table without expires_at: jobs run and beat, reap judges by
    stale_after alone (as before), one warning says what to run; upgrade_cancellation
    adds the column as create_all() makes it, and new Jobs write it."""
    caplog.set_level(logging.WARNING, logger="dbcancel")
    name = unique("jobs")
    workers = old_worker_table(scratch)
    Model = model_for(name)
    Model.__table__.create(scratch)  # the job table alone: its worker table is the old one
    with scratch.begin() as conn:
        conn.execute(Model.__table__.insert(), [{**r, "session_id": "s"} for r in ROWS])

    # Another process's beats (every 6 s), through a backend of this version.
    SQLAlchemyBackend(scratch, Model).beat_worker(OTHER, 6)  # inserts
    SQLAlchemyBackend(scratch, Model).beat_worker(OTHER, 6)  # updates
    with scratch.begin() as conn:
        beat = conn.execute(
            sa.select(workers.c.heartbeat_at).where(workers.c.id == OTHER)
        ).scalar_one()
        conn.execute(
            Model.__table__.update()
            .where(Model.__table__.c.id == 1)
            .values(status="in_progress", worker_id=OTHER, started_at=beat)
        )
    assert abs(beat - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
    jobs = Jobs(scratch, Model, interval=3600)
    assert jobs.reap(3) == 0
    # 4 s without a beat: without expires_at, stale_after alone judges, as before.
    with scratch.begin() as conn:
        old = beat - dt.timedelta(seconds=4)
        conn.execute(sa.update(workers).where(workers.c.id == OTHER).values(heartbeat_at=old))
    assert jobs.reap(3) == 1
    assert jobs.status(1) is Status.FAILED
    # A job runs on it, its worker row beaten by this process's heartbeat.
    with jobs.run(2):
        assert jobs.reap(3) == 0
    assert jobs.status(2) is Status.COMPLETED
    warned = [r for r in caplog.records if "no expires_at column" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "op.upgrade_cancellation()" in warned[0].getMessage()
    assert warned[0].levelno == logging.WARNING

    with ops_on(scratch) as ops:
        ops.upgrade_cancellation(name)  # type: ignore[attr-defined]
    assert worker_columns(scratch) == worker_columns(db.engine)  # create_all()'s
    with ops_on(scratch) as ops:
        upgrade_cancellation(ops, name)  # again: nothing to do
    assert worker_columns(scratch) == worker_columns(db.engine)

    # A backend made now finds the column: its beats write it.
    SQLAlchemyBackend(scratch, Model).beat_worker(OTHER, 6)
    table = worker_table(sa.MetaData())
    with scratch.connect() as conn:
        beat, expires = conn.execute(
            sa.select(table.c.heartbeat_at, table.c.expires_at).where(table.c.id == OTHER)
        ).one()
    assert expires - beat == dt.timedelta(seconds=18)
    assert len([r for r in caplog.records if "no expires_at column" in r.getMessage()]) == 1


def test_add_cancellation_adds_expires_at_to_an_old_worker_table(
    db: Database, scratch: sa.Engine
) -> None:
    """Another job table made cancellable after the worker table was made by an earlier
    dbcancel: the worker table gets the column too."""
    old_worker_table(scratch)
    name = unique("mig")
    table = sa.Table(name, sa.MetaData(), *own_columns(name))
    table.create(scratch)
    with ops_on(scratch) as ops:
        add_cancellation(ops, name)
    assert worker_columns(scratch) == worker_columns(db.engine)
