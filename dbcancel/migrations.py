"""Alembic helpers that make an existing job table cancellable, and undo it.

```python
# versions/xxxx_cancellable_analyses.py
import dbcancel.migrations  # registers op.add_cancellation / op.drop_cancellation

def upgrade():
    op.add_cancellation("analysis")

def downgrade():
    op.drop_cancellation("analysis")
```

`add_cancellation` gives the table what [`CancellableMixin`][dbcancel.CancellableMixin] declares, so
that the upgraded table equals `metadata.create_all()` of the model with the mixin: the
columns of `dbcancel.models.REQUIRED_COLUMNS` and `attempts` (same types, appended after the
table's own), the index `ix_<table>_status` and the CHECK constraint
`ck_<table>_status`. `drop_cancellation` removes exactly those again. Existing rows
keep their data. SQLite is altered in Alembic's batch mode (the table is copied into a
new one, with Alembic's caveats: unnamed CHECK constraints are not carried over, which
Alembic warns about, and tables that reference the job table need
`PRAGMA foreign_keys=OFF` meanwhile); PostgreSQL and MySQL/MariaDB are altered in place
(MySQL/MariaDB commit each statement: the checks below run before the first).

What existing rows get, and tables that already have a `status` column:

* A table without `status` gets `status VARCHAR(16) NOT NULL DEFAULT 'pending'`:
  every existing row becomes a pending job. To mark historical rows as finished, update
  them in the same migration, after `add_cancellation` (set `finished_at` too: a job
  without it has not stopped, and `jobs.wait()` would wait for it).
* A table whose own `status` column predates dbcancel is refused, with a message, unless
  the call says `existing_status=True`. The column is then kept as it is, with its type,
  nullability, default and values (it must be a string column with room for
  `in_progress`, not an ENUM); what the app stores there stays allowed: the CHECK
  constraint `ck_<table>_status` is created, or a narrower one of that name is
  replaced, to allow dbcancel's five states plus every value the column holds and every
  value the old constraint allowed. Rows whose status is not one of the five are not
  jobs dbcancel can read: map them to dbcancel's states before using `Jobs` on them.
  `drop_cancellation(..., existing_status=True)` then removes only the columns it
  added and leaves the `status` column, its index and its (wider) constraint, so the
  old code keeps working after a downgrade. The flag is explicit because nothing in the
  table can tell afterwards whether `status` was there before: without it, a downgrade
  would drop the app's column.

Both refuse to half-apply: everything is checked before the first statement, and a
table that already has any of the parts (`add_cancellation` twice) or lacks them
raises [`MigrationError`][dbcancel.migrations.MigrationError] naming the table and the
parts, with nothing changed.

Offline mode (`alembic upgrade --sql`) cannot inspect the table: on PostgreSQL and
MySQL/MariaDB it writes the statements for a table that has none of the parts (for
`add`) or all of them (for `drop`); SQLite's batch mode and `existing_status=True`
need a connection.

Importing this module needs Alembic (`pip install 'dbcancel[alembic]'`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

try:
    from alembic.operations import MigrateOperation, Operations
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "dbcancel.migrations needs Alembic, which is not installed: pip install 'dbcancel[alembic]'"
    ) from err

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .errors import DbcancelError
from .models import (
    ATTEMPTS_COLUMN,
    REQUIRED_COLUMNS,
    CancellableMixin,
    Status,
    status_check_name,
    status_check_sql,
    worker_table,
)

__all__ = [
    "AddCancellationOp",
    "DropCancellationOp",
    "MigrationError",
    "UpgradeCancellationOp",
    "add_cancellation",
    "drop_cancellation",
    "status_index_name",
    "upgrade_cancellation",
]


class MigrationError(DbcancelError):
    """A job table is not in the state a migration helper needs; nothing was changed."""


def status_index_name(table: str) -> str:
    """The name of the index on `status`: `ix_<table>_status`, as `create_all()`
    names the mixin's `index=True` column."""
    return f"ix_{table}_status"


# -- the operations ---------------------------------------------------------------------


@Operations.register_operation("add_cancellation")
class AddCancellationOp(MigrateOperation):
    """The Alembic operation behind `op.add_cancellation(table_name)`.

    Its `reverse` is the matching `DropCancellationOp`.
    """

    def __init__(
        self, table_name: str, *, schema: str | None = None, existing_status: bool = False
    ) -> None:
        _check_name(table_name)
        self.table_name = table_name
        self.schema = schema
        self.existing_status = bool(existing_status)

    @classmethod
    def add_cancellation(
        cls,
        operations: Operations,
        table_name: str,
        *,
        schema: str | None = None,
        existing_status: bool = False,
    ) -> None:
        """Make the existing table `table_name` cancellable (see
        [`dbcancel.migrations`][dbcancel.migrations]).

        Adds dbcancel's columns, the index `ix_<table>_status` and the CHECK constraint
        `ck_<table>_status`. `existing_status=True` adopts a `status` column the
        table already has instead of refusing it.
        """
        operations.invoke(cls(table_name, schema=schema, existing_status=existing_status))

    def reverse(self) -> DropCancellationOp:
        """The operation that undoes this one."""
        return DropCancellationOp(
            self.table_name, schema=self.schema, existing_status=self.existing_status
        )

    def __repr__(self) -> str:
        return _repr(self)


@Operations.register_operation("drop_cancellation")
class DropCancellationOp(MigrateOperation):
    """The Alembic operation behind `op.drop_cancellation(table_name)`.

    Its `reverse` is the matching `AddCancellationOp`.
    """

    def __init__(
        self, table_name: str, *, schema: str | None = None, existing_status: bool = False
    ) -> None:
        _check_name(table_name)
        self.table_name = table_name
        self.schema = schema
        self.existing_status = bool(existing_status)

    @classmethod
    def drop_cancellation(
        cls,
        operations: Operations,
        table_name: str,
        *,
        schema: str | None = None,
        existing_status: bool = False,
    ) -> None:
        """Undo `AddCancellationOp.add_cancellation` on `table_name`.

        Drops the CHECK constraint, the status index and dbcancel's columns; with
        `existing_status=True` (pass what the upgrade passed) only the columns
        beside `status`. The rows and their other columns stay.
        """
        operations.invoke(cls(table_name, schema=schema, existing_status=existing_status))

    def reverse(self) -> AddCancellationOp:
        """The operation that undoes this one."""
        return AddCancellationOp(
            self.table_name, schema=self.schema, existing_status=self.existing_status
        )

    def __repr__(self) -> str:
        return _repr(self)


@Operations.register_operation("upgrade_cancellation")
class UpgradeCancellationOp(MigrateOperation):
    """The Alembic operation behind `op.upgrade_cancellation(table_name)`."""

    def __init__(self, table_name: str, *, schema: str | None = None) -> None:
        _check_name(table_name)
        self.table_name = table_name
        self.schema = schema

    @classmethod
    def upgrade_cancellation(
        cls, operations: Operations, table_name: str, *, schema: str | None = None
    ) -> None:
        """Bring a table made cancellable by an earlier dbcancel up to this one.

        Adds the columns this version needs that the table lacks (nullable, or with a
        server default: the rows keep their data), the worker table if the database has
        none, and the worker table's missing columns (`expires_at`); does nothing when all is there,
        so it is safe to run again, in every migration after an upgrade of dbcancel.
        """
        operations.invoke(cls(table_name, schema=schema))

    def __repr__(self) -> str:
        schema = "" if self.schema is None else f", schema={self.schema!r}"
        return f"UpgradeCancellationOp({self.table_name!r}{schema})"


def upgrade_cancellation(op: Any, table_name: str, *, schema: str | None = None) -> None:
    """Bring the job table `table_name` up to this dbcancel; `op` is Alembic's `op`.

    The same as `op.upgrade_cancellation(table_name)`: adds the columns a newer
    dbcancel needs (`cancel_observed_at`, `worker_id`, nullable; `attempts`, not null
    with a server default of 0), creates the worker table,
    and adds the worker table's nullable `expires_at`, where they are missing. Raises
    [`MigrationError`][dbcancel.migrations.MigrationError], changing nothing, when the table
    has no `status` column (use [`add_cancellation`][dbcancel.migrations.add_cancellation]).
    Its downgrade may leave the columns: older versions ignore them.
    """
    op.invoke(UpgradeCancellationOp(table_name, schema=schema))


def add_cancellation(
    op: Any, table_name: str, *, schema: str | None = None, existing_status: bool = False
) -> None:
    """Make the existing table `table_name` cancellable; `op` is Alembic's `op`.

    The same as `op.add_cancellation(table_name)`; see
    [`dbcancel.migrations`][dbcancel.migrations] for what it adds and for `existing_status`.
    Raises [`MigrationError`][dbcancel.migrations.MigrationError], changing nothing, when
    the table is missing or already has any of the parts.
    """
    op.invoke(AddCancellationOp(table_name, schema=schema, existing_status=existing_status))


def drop_cancellation(
    op: Any, table_name: str, *, schema: str | None = None, existing_status: bool = False
) -> None:
    """Undo [`add_cancellation`][dbcancel.migrations.add_cancellation] on `table_name`; `op`
    is Alembic's `op`.

    The same as `op.drop_cancellation(table_name)`. Pass the `existing_status` the
    upgrade passed. Raises [`MigrationError`][dbcancel.migrations.MigrationError], changing
    nothing, when the table lacks any of the columns `add_cancellation` added.
    """
    op.invoke(DropCancellationOp(table_name, schema=schema, existing_status=existing_status))


def _check_name(table_name: Any) -> None:
    if not isinstance(table_name, str) or not table_name:
        raise TypeError(f"table_name must be the name of a table, got {table_name!r}")


def _repr(op: AddCancellationOp | DropCancellationOp) -> str:
    args = [repr(op.table_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    if op.existing_status:
        args.append("existing_status=True")
    return f"{type(op).__name__}({', '.join(args)})"


# -- what create_all() would create ----------------------------------------------------


class _ProbeBase(DeclarativeBase):
    pass


class _Probe(CancellableMixin, _ProbeBase):
    """A model with the mixin, only to read the mixin's column definitions from."""

    __tablename__ = "dbcancel_migrations_probe"
    id: Mapped[int] = mapped_column(primary_key=True)


def _new_column(name: str) -> sa.Column[Any]:
    """A fresh copy of the mixin's column `name` (type, nullability, server default)."""
    source = _Probe.__table__.c[name]
    default = source.server_default
    arg = default.arg if isinstance(default, sa.DefaultClause) else None
    return sa.Column(
        name,
        source.type,
        nullable=source.nullable,
        server_default=arg if isinstance(arg, str) else None,
    )


# In the order create_all() gives them, which is not that of REQUIRED_COLUMNS.
_COLUMNS = tuple(
    c.name for c in _Probe.__table__.c if c.name in REQUIRED_COLUMNS or c.name == ATTEMPTS_COLUMN
)
# Columns a table made by an earlier dbcancel may lack: a downgrade drops them only
# where they are.
_OPTIONAL_COLUMNS = frozenset({ATTEMPTS_COLUMN})
_OTHER_COLUMNS = tuple(c for c in _COLUMNS if c != "status")
_STATES = tuple(s.value for s in Status)
_MIN_STATUS_LENGTH = max(len(s) for s in _STATES)
_LITERAL = re.compile(r"'((?:[^']|'')*)'")
# MySQL/MariaDB also escape with backslashes, and write reflected literals that way.
_MYSQL_LITERAL = re.compile(r"'((?:[^'\\]|\\.|'')*)'")
_MYSQL_ESCAPES = {"0": "\0", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


# -- reading the table ------------------------------------------------------------------


@dataclass
class _Table:
    """What the table has now, as far as the helpers care."""

    name: str
    schema: str | None
    dialect: str
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    index_names: set[str] = field(default_factory=set)
    status_indexed: bool = False
    checks: dict[str, str] = field(default_factory=dict)
    status_values: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    @property
    def ck(self) -> str:
        return status_check_name(self.name)

    @property
    def ix(self) -> str:
        return status_index_name(self.name)


def _read(operations: Operations, name: str, schema: str | None) -> _Table:
    bind = operations.get_bind()
    inspector = sa.inspect(bind)
    table = _Table(name, schema, bind.dialect.name)
    if not inspector.has_table(name, schema=schema):
        where = f" in schema {schema!r}" if schema else ""
        raise MigrationError(f"no table {name!r}{where} to alter; nothing was changed")
    table.columns = {c["name"]: dict(c) for c in inspector.get_columns(name, schema=schema)}
    for index in inspector.get_indexes(name, schema=schema):
        if index["name"]:
            table.index_names.add(index["name"])
        if list(index["column_names"][:1]) == ["status"]:
            table.status_indexed = True
    for check in inspector.get_check_constraints(name, schema=schema):
        if check["name"]:
            table.checks[check["name"]] = str(check["sqltext"])
    if "status" in table.columns:
        status = sa.table(name, sa.column("status"), schema=schema).c.status
        rows = bind.execute(sa.select(status).distinct().where(status.is_not(None)))
        table.status_values = sorted(str(v) for (v,) in rows)
    return table


def _assumed(
    operations: Operations, name: str, schema: str | None, *, dbcancel_parts: bool
) -> _Table:
    """Offline mode: a table with none (or all) of dbcancel's parts."""
    table = _Table(name, schema, operations.get_context().dialect.name)
    if dbcancel_parts:
        table.columns = {c: {"name": c} for c in _COLUMNS}
        table.index_names = {table.ix}
        table.checks = {table.ck: status_check_sql()}
    return table


def _offline(operations: Operations, what: str, existing_status: bool) -> bool:
    context = operations.get_context()
    if not context.as_sql:
        return False
    if context.dialect.name == "sqlite":
        raise MigrationError(
            f"{what} cannot run in offline (--sql) mode on SQLite: batch mode copies the "
            "table and needs to read it first; run the migration against the database"
        )
    if existing_status:
        raise MigrationError(
            f"{what}(existing_status=True) cannot run in offline (--sql) mode: it reads "
            "the values of the status column; run the migration against the database"
        )
    return True


def _parts(columns: Iterable[str], table: _Table, *, index: bool, check: bool) -> list[str]:
    names = [f"column {c}" for c in columns]
    if index:
        names.append(f"index {table.ix}")
    if check:
        names.append(f"constraint {table.ck}")
    return names


# -- add --------------------------------------------------------------------------------


@Operations.implementation_for(AddCancellationOp)
def _add(operations: Operations, operation: AddCancellationOp) -> None:
    name, schema = operation.table_name, operation.schema
    if _offline(operations, "add_cancellation", operation.existing_status):
        table = _assumed(operations, name, schema, dbcancel_parts=False)
    else:
        table = _read(operations, name, schema)

    if operation.existing_status:
        columns, condition, replace_check, index = _plan_adopt(table)
    else:
        columns, condition, replace_check, index = _plan_add(table)

    new_columns = [_new_column(c) for c in columns]
    f = operations.f
    _create_worker_table(operations, schema)
    if operations.get_context().dialect.name == "sqlite":
        with operations.batch_alter_table(name, schema=schema) as batch:
            for column in new_columns:
                batch.add_column(column)
            if index:
                batch.create_index(f(table.ix), ["status"])
            if replace_check:
                batch.drop_constraint(f(table.ck), type_="check")
            if condition is not None:
                batch.create_check_constraint(f(table.ck), condition)
        return
    for column in new_columns:
        operations.add_column(name, column, schema=schema)
    if index:
        operations.create_index(f(table.ix), name, ["status"], schema=schema)
    if replace_check:
        operations.drop_constraint(f(table.ck), name, type_="check", schema=schema)
    if condition is not None:
        operations.create_check_constraint(f(table.ck), name, condition, schema=schema)


def _plan_add(table: _Table) -> tuple[list[str], Any, bool, bool]:
    """A table without dbcancel's parts: add them all, as create_all() would."""
    present = [c for c in _COLUMNS if c in table.columns]
    has_ix, has_ck = table.ix in table.index_names, table.ck in table.checks
    if present or has_ix or has_ck:
        found = ", ".join(_parts(present, table, index=has_ix, check=has_ck))
        if present == list(_COLUMNS):
            hint = "add_cancellation has already run on it"
        elif present == ["status"]:
            hint = (
                "its status column predates dbcancel: pass existing_status=True to keep it "
                f"(its values stay allowed; {table.ck} is widened to dbcancel's states), and "
                "pass the same to drop_cancellation so that a downgrade keeps it too"
            )
        else:
            hint = "rename or drop them first, or add the missing parts by hand"
        raise MigrationError(f"{table.label} already has {found}: {hint}. Nothing was changed")
    return list(_COLUMNS), status_check_sql(), False, True


def _plan_adopt(table: _Table) -> tuple[list[str], Any, bool, bool]:
    """A table with its own status column: keep it, widen or create its constraint."""
    column = table.columns.get("status")
    if column is None:
        raise MigrationError(
            f"{table.label} has no status column for existing_status=True to keep; call "
            "add_cancellation without it to add one. Nothing was changed"
        )
    present = [c for c in _OTHER_COLUMNS if c in table.columns]
    if present:
        found = ", ".join(f"column {c}" for c in present)
        hint = (
            "add_cancellation has already run on it"
            if len(present) == len(_OTHER_COLUMNS)
            else "rename or drop them first"
        )
        raise MigrationError(f"{table.label} already has {found}: {hint}. Nothing was changed")
    kind = column["type"]
    length = getattr(kind, "length", None)
    if (
        not isinstance(kind, sa.String)
        or isinstance(kind, sa.Enum)
        or (length is not None and length < _MIN_STATUS_LENGTH)
    ):
        raise MigrationError(
            f"{table.label}.status is {kind!r}; dbcancel needs a string column with room "
            f"for {_MIN_STATUS_LENGTH} characters ('in_progress'), such as VARCHAR(16): "
            "alter it first. Nothing was changed"
        )
    old = table.checks.get(table.ck)
    allowed = set(_literals(old, table.dialect)) if old is not None else set()
    if old is not None and set(_STATES) <= allowed:
        # Already allows every state: leave the app's constraint alone.
        condition = None
    else:
        extra = sorted((allowed | set(table.status_values)) - set(_STATES))
        condition = sa.column("status").in_([*_STATES, *extra])
    replace = old is not None and condition is not None
    index = not table.status_indexed and table.ix not in table.index_names
    return list(_OTHER_COLUMNS), condition, replace, index


def _literals(sqltext: str, dialect: str) -> list[str]:
    """The string literals of a reflected CHECK constraint (PostgreSQL writes
    `'done'::character varying`, SQLite `'done'`, MariaDB `'it\\'s'`)."""
    if dialect in ("mysql", "mariadb"):
        return [
            re.sub(r"\\(.)", lambda m: _MYSQL_ESCAPES.get(m[1], m[1]), v.replace("''", "'"))
            for v in _MYSQL_LITERAL.findall(sqltext)
        ]
    return [v.replace("''", "'") for v in _LITERAL.findall(sqltext)]


def _create_worker_table(operations: Operations, schema: str | None) -> None:
    """The worker table, unless an earlier migration (of another job table) made it; and
    the columns it lacks when an earlier dbcancel made it (`expires_at`; all nullable).

    Offline (`--sql`) nothing can be read: only the `CREATE TABLE IF NOT EXISTS`.
    """
    table = worker_table(sa.MetaData(), schema)
    if operations.get_context().as_sql:
        operations.execute(sa.schema.CreateTable(table, if_not_exists=True))
        return
    inspector = sa.inspect(operations.get_bind())
    if not inspector.has_table(table.name, schema=schema):
        operations.execute(sa.schema.CreateTable(table, if_not_exists=True))
        return
    present = {c["name"] for c in inspector.get_columns(table.name, schema=schema)}
    for column in table.c:
        if column.name not in present:
            # A nullable column without a default: SQLite adds it in place too.
            new = sa.Column(column.name, column.type, nullable=True)
            operations.add_column(table.name, new, schema=schema)


# -- upgrade ----------------------------------------------------------------------------


@Operations.implementation_for(UpgradeCancellationOp)
def _upgrade(operations: Operations, operation: UpgradeCancellationOp) -> None:
    name, schema = operation.table_name, operation.schema
    if operations.get_context().as_sql:
        raise MigrationError(
            "upgrade_cancellation cannot run in offline (--sql) mode: it reads which "
            "columns the table has; run the migration against the database"
        )
    table = _read(operations, name, schema)
    if "status" not in table.columns:
        raise MigrationError(
            f"{table.label} has no status column: it is not cancellable yet; use "
            "add_cancellation. Nothing was changed"
        )
    missing = [_new_column(c) for c in _OTHER_COLUMNS if c not in table.columns]
    _create_worker_table(operations, schema)
    if not missing:
        return
    if operations.get_context().dialect.name == "sqlite":
        with operations.batch_alter_table(name, schema=schema) as batch:
            for column in missing:
                batch.add_column(column)
        return
    for column in missing:
        operations.add_column(name, column, schema=schema)


# -- drop -------------------------------------------------------------------------------


@Operations.implementation_for(DropCancellationOp)
def _drop(operations: Operations, operation: DropCancellationOp) -> None:
    name, schema = operation.table_name, operation.schema
    keep_status = operation.existing_status
    if _offline(operations, "drop_cancellation", keep_status):
        table = _assumed(operations, name, schema, dbcancel_parts=True)
    else:
        table = _read(operations, name, schema)

    wanted = tuple(
        c
        for c in (_OTHER_COLUMNS if keep_status else _COLUMNS)
        if c in table.columns or c not in _OPTIONAL_COLUMNS
    )
    missing = [c for c in wanted if c not in table.columns]
    if keep_status and "status" not in table.columns:
        missing.insert(0, "status")
    if missing:
        raise MigrationError(
            f"{table.label} lacks {', '.join(f'column {c}' for c in missing)}, which "
            "add_cancellation adds: it has not run on this table, or was partly undone. "
            "Nothing was changed"
        )
    foreign = [v for v in table.status_values if v not in _STATES]
    if not keep_status and foreign:
        raise MigrationError(
            f"{table.label}.status holds values dbcancel never writes "
            f"({', '.join(map(repr, foreign))}): the column predates add_cancellation. "
            "Pass existing_status=True, as the upgrade should have, to keep it. "
            "Nothing was changed"
        )
    drop_ck = not keep_status and table.ck in table.checks
    drop_ix = not keep_status and table.ix in table.index_names
    f = operations.f
    if operations.get_context().dialect.name == "sqlite":
        with operations.batch_alter_table(name, schema=schema) as batch:
            if drop_ck:
                batch.drop_constraint(f(table.ck), type_="check")
            if drop_ix:
                batch.drop_index(f(table.ix))
            for column in wanted:
                batch.drop_column(column)
        return
    # The constraint and the index first: MariaDB refuses to drop a column a CHECK names.
    if drop_ck:
        operations.drop_constraint(f(table.ck), name, type_="check", schema=schema)
    if drop_ix:
        operations.drop_index(f(table.ix), table_name=name, schema=schema)
    for column in wanted:
        operations.drop_column(name, column, schema=schema)
