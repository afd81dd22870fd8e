"""The SQLAlchemy implementation of [`dbcancel.backend.Backend`][dbcancel.backend.Backend]."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

try:
    from sqlalchemy import (
        BigInteger,
        Column,
        Connection,
        Dialect,
        Engine,
        Enum,
        Integer,
        MetaData,
        SmallInteger,
        String,
        Table,
        Text,
        TypeDecorator,
        and_,
        bindparam,
        case,
        column,
        event,
        func,
        inspect,
        literal,
        literal_column,
        or_,
        select,
        table,
        update,
    )
    from sqlalchemy.engine import URL
    from sqlalchemy.exc import CompileError, DBAPIError, NoSuchTableError
    from sqlalchemy.ext.compiler import compiles
    from sqlalchemy.orm import Session, sessionmaker
    from sqlalchemy.sql import Select
    from sqlalchemy.sql.compiler import SQLCompiler
    from sqlalchemy.sql.functions import FunctionElement
except ImportError as err:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "Jobs(engine, Model) runs on SQLAlchemy, which is not installed: "
        "pip install 'dbcancel[sqlalchemy]' (a Django project uses "
        "dbcancel.contrib.django.DjangoJobs, which needs no SQLAlchemy)"
    ) from err

from . import _timeouts
from ._identity import ROUTING_OPTIONS, Identity
from ._mixin import UTCDateTime, worker_table
from ._pg import channel_name
from .backend import (
    RETRIES,
    Change,
    Faults,
    FilterRule,
    JobRow,
    Listener,
    beat_lifetime,
    cancel_payload,
    check_filter_keys,
    check_id_type,
    end_payload,
    integer_bounds,
    is_transient_error,
    run_retried,
    utcnow,
    warn_old_worker_table,
)
from .errors import DbcancelError
from .models import REQUIRED_COLUMNS, WORKER_TABLE, Status

_T = TypeVar("_T")

__all__ = [
    "SQLAlchemyBackend",
    "channel_name",
    "exact_text",
    "filter_rule",
    "resolve_engine",
    "resolve_table",
    "server_expiry",
    "server_now",
]


def resolve_engine(bind: Any) -> Engine:
    """The Engine behind `bind`: an Engine, one made by `engine.execution_options()`
    (whose options, `schema_translate_map` among them, apply to every statement), or
    a sessionmaker bound to either."""
    if isinstance(bind, Engine):
        return bind
    if isinstance(bind, sessionmaker):
        engine = bind.kw.get("bind")
        if isinstance(engine, Engine):
            return engine
        raise TypeError("the sessionmaker passed to Jobs has no Engine bind; pass the Engine")
    raise TypeError(
        f"Jobs needs an Engine or a sessionmaker bound to one, got {type(bind).__name__}"
    )


def resolve_table(model: Any) -> tuple[Table, str]:
    """The Table of `model` (a mapped class or a Table) and the name used in messages."""
    if isinstance(model, Table):
        return model, model.name
    table = getattr(model, "__table__", None)
    if isinstance(model, type) and isinstance(table, Table):
        return table, model.__name__
    raise TypeError(f"expected a mapped model class or a Table, got {model!r}")


class exact_text(FunctionElement[str]):
    """A string operand in a form that compares exactly: same characters, same case,
    trailing spaces counted, whatever the column's collation.

    MySQL/MariaDB compare the utf8mb4 bytes (their `_ci` collations ignore case and
    accents, and PAD SPACE ignores trailing spaces even in `_bin`); PostgreSQL
    compares as text in the "C" collation (a nondeterministic or `citext` column
    would not be exact); SQLite uses its BINARY collation (a `NOCASE` column would
    not be exact).
    """

    type = String()
    name = "exact_text"
    inherit_cache = True


@compiles(exact_text)
def _exact_default(element: exact_text, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(exact_text, "sqlite")
def _exact_sqlite(element: exact_text, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.process(element.clauses, **kw)} COLLATE BINARY"


@compiles(exact_text, "postgresql")
def _exact_postgresql(element: exact_text, compiler: SQLCompiler, **kw: Any) -> str:
    return f'CAST({compiler.process(element.clauses, **kw)} AS TEXT) COLLATE "C"'


@compiles(exact_text, "mysql")
@compiles(exact_text, "mariadb")
def _exact_mysql(element: exact_text, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(CONVERT({compiler.process(element.clauses, **kw)} USING utf8mb4) AS BINARY)"


class server_now(FunctionElement[dt.datetime]):
    """The database's clock, as an aware UTC timestamp with microseconds.

    Heartbeats and staleness are judged on it, so that a host whose clock is off
    neither looks dead while alive nor alive when dead. SQLite is embedded: its clock
    is the machine's, read by the SQLite library itself.
    """

    type = UTCDateTime()
    name = "server_now"
    inherit_cache = True


@compiles(server_now)
def _now_default(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(server_now, "postgresql")
def _now_postgresql(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "statement_timestamp()"


@compiles(server_now, "mysql")
@compiles(server_now, "mariadb")
def _now_mysql(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


@compiles(server_now, "sqlite")
def _now_sqlite(element: server_now, compiler: SQLCompiler, **kw: Any) -> str:
    # The format SQLAlchemy stores datetimes in, so that text comparisons order them.
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


class server_expiry(FunctionElement[dt.datetime]):
    """The database's clock plus a whole number of microseconds (its one argument), as
    `server_now` gives it: when a worker row that beats now stops counting as
    alive (see [`dbcancel.backend.beat_lifetime`][dbcancel.backend.beat_lifetime]).

    In the same statement as `server_now`, both read the same instant (the
    statement's timestamp on PostgreSQL, the statement's `UTC_TIMESTAMP` on
    MySQL/MariaDB, the step's `'now'` on SQLite).
    """

    type = UTCDateTime()
    name = "server_expiry"
    inherit_cache = True


@compiles(server_expiry)
def _expiry_default(element: server_expiry, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"dbcancel's worker expiry has no SQL for {compiler.dialect.name}; it supports "
        "SQLite, PostgreSQL and MySQL/MariaDB"
    )


@compiles(server_expiry, "postgresql")
def _expiry_postgresql(element: server_expiry, compiler: SQLCompiler, **kw: Any) -> str:
    micros = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + CAST({micros} AS BIGINT) * INTERVAL '1 microsecond')"


@compiles(server_expiry, "mysql")
@compiles(server_expiry, "mariadb")
def _expiry_mysql(element: server_expiry, compiler: SQLCompiler, **kw: Any) -> str:
    micros = compiler.process(element.clauses, **kw)
    return f"TIMESTAMPADD(MICROSECOND, {micros}, UTC_TIMESTAMP(6))"


@compiles(server_expiry, "sqlite")
def _expiry_sqlite(element: server_expiry, compiler: SQLCompiler, **kw: Any) -> str:
    micros = compiler.process(element.clauses, **kw)
    shift = f"printf('%+.6f seconds', {micros} / 1000000.0)"
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', {shift}) || '000')"


def _integer_bits(type_: Any) -> int:
    name = type(type_).__name__.upper()
    if name == "TINYINT":
        return 8
    if name == "MEDIUMINT":
        return 24
    if isinstance(type_, SmallInteger):
        return 16
    if isinstance(type_, BigInteger):
        return 64
    return 32


def filter_rule(column: Column[Any], dialect: Dialect) -> FilterRule:
    """The values a filter on `column` accepts, and the integers it can hold."""
    type_ = column.type
    while isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    try:
        python_type: type | None = column.type.python_type
    except NotImplementedError:
        python_type = None
    if isinstance(type_, Enum) and python_type is not str:
        python_type = None  # members or their names: the Enum type converts either
    bounds = None
    if isinstance(type_, Integer):
        if dialect.name == "sqlite":
            bounds = integer_bounds(64)  # every INTEGER holds 64 bits there
        else:
            bounds = integer_bounds(
                _integer_bits(type_), unsigned=bool(getattr(type_, "unsigned", False))
            )
    return FilterRule(python_type, bounds)


# -- which table: the identity of a table as the server resolves it -------------------


def server_of(url: URL) -> tuple[Any, ...]:
    """`(host, port, routing options)`: what of `url` picks the server reached. The
    database and the schema are asked of the server itself (see `_resolve`)."""
    routing = sorted(
        (k, v if isinstance(v, str) else tuple(v))
        for k, v in url.query.items()
        if k in ROUTING_OPTIONS
    )
    return url.host, url.port, tuple(routing)


def vendor_of(dialect: Dialect) -> str:
    """The family of database servers: MariaDB is reached as MySQL or as MariaDB."""
    return "mysql" if dialect.name == "mariadb" else dialect.name


_PG_CLASS = table("pg_class", column("oid"), column("relnamespace"), schema="pg_catalog")


def _pg_schema_of(reference: str, schema: str | None) -> Any:
    """SQL for the schema `reference` (the table's name, quoted, and qualified when
    `schema` is given) resolves to on the connection: dbcancel._pg.SCHEMA_OF, with
    `schema` itself while an explicitly qualified table does not exist."""
    found = (
        select(literal_column("relnamespace::regnamespace::text", String()))
        .select_from(_PG_CLASS)
        # Rendered into the statement, not bound: a bound parameter more would take a
        # poll of 50 jobs past the 50 parameters whose parsing psycopg caches.
        .where(
            _PG_CLASS.c.oid == func.to_regclass(literal(reference, Text(), literal_execute=True))
        )
        .scalar_subquery()
    )
    fallback = func.current_schema() if schema is None else literal(schema, String())
    return func.coalesce(found, func.quote_ident(fallback), type_=String())


def _sqlite_file(file: str | None, engine: Engine) -> str:
    """A SQLite database's file, resolved; an in-memory one is its pool's own."""
    if file:
        return os.path.realpath(file)
    return f":memory:{id(engine.pool)}"


class SQLAlchemyBackend:
    """Jobs in one table, reached through one SQLAlchemy Engine."""

    def __init__(self, bind: Any, model: Any) -> None:
        self.engine = resolve_engine(bind)
        self.table, self.model_name = resolve_table(model)
        missing = [name for name in REQUIRED_COLUMNS if name not in self.table.c]
        if missing:
            raise TypeError(
                f"{self.model_name} lacks the column(s) {', '.join(missing)} that dbcancel "
                "needs; add CancellableMixin to the model (and its columns to the table: "
                "op.add_cancellation() in an Alembic migration, or op.upgrade_cancellation() "
                "for a table made cancellable by an earlier dbcancel)"
            )
        pk = list(self.table.primary_key.columns)
        if len(pk) != 1:
            raise TypeError(
                f"{self.model_name} needs a single-column primary key to identify jobs, "
                f"it has {len(pk)}"
            )
        self.pk: Column[Any] = pk[0]
        dialect = self.engine.dialect
        self._rules = {col.key: filter_rule(col, dialect) for col in self.table.c}
        self._id_rule = filter_rule(self.pk, dialect)
        self._id_type = self._id_rule.python_type
        # Strings compared exactly (see exact_text), except for Enum columns, whose
        # values are a fixed set of names.
        self._exact = frozenset(
            col.key
            for col in self.table.c
            if self._rules[col.key].python_type is str and not isinstance(col.type, Enum)
        )
        self._postgresql = dialect.name == "postgresql"
        # psycopg prepares a statement run often (5 times by default) on the server
        # session; behind a pooler in transaction mode the next transaction may run on
        # another server session, where it is missing, or already there. dbcancel's own
        # statements are never prepared (see _unprepared).
        self._psycopg = self._postgresql and dialect.driver == "psycopg"
        self._listen_dsn: str | None = None
        _bound_connects(self.engine)
        self._autocommit_reads = self._postgresql
        self.label = f"{self.model_name}@{self.engine.url.get_backend_name()}"

        # Which tables: resolved on first use (see Identity), never here, so that a
        # Jobs can be built while the database is down. The schema is the table's after
        # the engine's schema_translate_map (what SQLAlchemy renders); None leaves it to
        # the connection's search_path, which only the server can tell.
        translate = self.engine.get_execution_options().get("schema_translate_map") or {}
        schema = self.table.schema
        self._schema: str | None = translate.get(schema, schema)
        self._identity: Identity | None = None
        self._identity_lock = threading.Lock()
        preparer = dialect.identifier_preparer
        qualify = "" if self._schema is None else f"{preparer.quote_schema(self._schema)}."
        self._job_schema: Any = None
        self._worker_schema: Any = None
        if self._postgresql:
            reference = qualify + preparer.quote(self.table.name)
            self._job_schema = _pg_schema_of(reference, self._schema)
            workers = qualify + preparer.quote(WORKER_TABLE)
            self._worker_schema = _pg_schema_of(workers, self._schema)
        # A table found through the search_path: every statement also says where it
        # found the table (a column more, no round trip more), so that a search_path
        # that changed under this engine is refused rather than followed.
        self._checked = self._postgresql and self._schema is None

        c = self.table.c
        self._columns = (c.status, c.cancel_reason, c.finished_at, c.error, c.worker_id)
        self._read_one = self._checking(select(*self._columns)).where(
            self.pk == bindparam("job_id")
        )
        self._read_many = self._checking(select(self.pk, *self._columns)).where(
            self.pk.in_(bindparam("job_ids", expanding=True))
        )
        self._mark_stopped = self._checking(
            update(self.table)
            .where(self.pk == bindparam("job_id"), c.finished_at.is_(None))
            .values(
                finished_at=bindparam("now", type_=c.finished_at.type),
                cancel_observed_at=func.coalesce(
                    c.cancel_observed_at,
                    bindparam("observed", type_=c.cancel_observed_at.type),
                ),
            )
        )
        w = self.workers = worker_table(MetaData(), self.table.schema).c
        self._server_now = select(server_now())
        if self._checked:
            self._server_now = self._server_now.add_columns(self._job_schema, self._worker_schema)
        # Statements for a worker table with expires_at, and for one made before it.
        self._liveness = _Liveness.build(self.table, w.id.table, self._checking, expiry=True)
        self._legacy = _Liveness.build(self.table, w.id.table, self._checking, expiry=False)
        self._expiry = True  # until a statement finds the column missing

    # -- identity ---------------------------------------------------------------------

    @property
    def key(self) -> Hashable:
        """The job table as the server resolves it (see `_resolve`); asks the
        database the first time, then a cached read."""
        return (self._identity or self._identify()).key

    @property
    def worker_key(self) -> Hashable:
        """The worker table beside the job table, as the server resolves it."""
        return (self._identity or self._identify()).worker_key

    @property
    def channel(self) -> str:
        """This table's PostgreSQL notification channel."""
        return (self._identity or self._identify()).channel

    def _identify(self) -> Identity:
        """Resolve the tables on the database, once (a failed try is tried again at the
        next use); one round trip, in the calling thread."""
        with self._identity_lock:
            if self._identity is None:
                self._identity = self._read(self._resolve)
            return self._identity

    def _resolve(self, conn: Connection) -> Identity:
        """`key` `("sqlalchemy", vendor, server, database, schema, table)` and
        `worker_key` `("sqlalchemy", vendor, server, database, worker schema)`.

        `server` is `server_of` the URL; `database` PostgreSQL's
        `current_database()`, the table's database on MySQL and MariaDB, the resolved
        path of the database file on SQLite (an in-memory database: its pool's own);
        `schema` the table's after the engine's `schema_translate_map`, or else
        where the connection's `search_path` finds it (PostgreSQL: the namespace of
        `to_regclass()`, the current schema while the table does not exist; MySQL:
        `DATABASE()`; SQLite: the attached name, `main`).
        """
        engine = self.engine
        vendor = vendor_of(engine.dialect)
        server = server_of(engine.url)
        schema = worker_schema = self._schema
        if self._postgresql:
            query = select(func.current_database(), self._job_schema, self._worker_schema)
            database, schema, worker_schema = conn.execute(query).one()
        elif vendor == "mysql":
            # MySQL's schemas are its databases: the table's, or the connection's.
            if schema is None:
                schema = worker_schema = conn.execute(select(func.database())).scalar_one()
            database = schema
        elif vendor == "sqlite":
            # An attached database is a schema there; its file is the database.
            schema = worker_schema = schema or "main"
            files = {row[1]: row[2] for row in conn.exec_driver_sql("PRAGMA database_list")}
            database = _sqlite_file(files.get(schema), engine)
        else:
            database = engine.url.database
            schema = worker_schema = schema or engine.dialect.default_schema_name
        name = self.table.name
        self._check_tables(conn)
        return Identity(
            key=("sqlalchemy", vendor, server, database, schema, name),
            worker_key=("sqlalchemy", vendor, server, database, worker_schema),
            schema=schema,
            worker_schema=worker_schema,
            channel=channel_name(str(schema), name),
        )

    def _check_tables(self, conn: Connection) -> None:
        """Refuse, once and clearly, a job table or worker table that does not exist,
        rather than let the first statement that needs it fail with the driver's error
        (the worker table's only at the first run, deep in the runtime)."""
        found = inspect(conn)
        job_table = found.has_table(self.table.name, schema=self._schema)
        workers = found.has_table(WORKER_TABLE, schema=self._schema)
        if job_table and workers:
            return
        where = "" if self._schema is None else f" in schema {self._schema!r}"
        verb = "does not exist"
        if not job_table:
            missing = f"the table {self.table.name!r} of {self.model_name}"
            if not workers:
                missing += f" and the worker table {WORKER_TABLE!r}"
                verb = "do not exist"
            fix = (
                "create the tables with metadata.create_all(engine) (CancellableMixin puts "
                f"{WORKER_TABLE!r} in the model's metadata too), or in an Alembic migration"
            )
        else:
            missing = f"the worker table {WORKER_TABLE!r} beside {self.model_name}'s table"
            fix = (
                "every process that runs jobs beats its row there, and reap() reads it: "
                "create it with metadata.create_all(engine) (CancellableMixin puts it in the "
                "model's metadata), or in a migration with op.add_cancellation() or "
                "op.upgrade_cancellation()"
            )
        raise DbcancelError(
            f"{missing} {verb}{where} on {self.engine.url.render_as_string()}: "
            f"{fix}; nothing was changed"
        )

    def _checking(self, stmt: Any, *, worker: bool = False) -> Any:
        """`stmt` also selecting (or returning) the schema its table is found in, when
        that is the search_path's to say (see `_checked`)."""
        if not self._checked:
            return stmt
        found = self._worker_schema if worker else self._job_schema
        if isinstance(stmt, Select):
            return stmt.add_columns(found)
        return stmt.returning(found)

    def _check(self, found: Any, job_ids: Any, *, worker: bool = False) -> None:
        """Refuse a statement that found the table in another schema than the one this
        backend identified: the connection's search_path moved (a checkout event, a
        `SET search_path` per request), and its keys would name another tenant's
        table. The statement's transaction is rolled back: nothing was changed."""
        ident = self._identity
        assert ident is not None
        expected = ident.worker_schema if worker else ident.schema
        if found == expected:
            return
        table = WORKER_TABLE if worker else self.table.name
        if job_ids is None:
            which = self.model_name
        elif isinstance(job_ids, list):  # a poll of several jobs
            shown = ", ".join(map(repr, job_ids[:5]))
            more = f" and {len(job_ids) - 5} more" if len(job_ids) > 5 else ""
            which = f"{self.model_name} jobs {shown}{more}"
        else:
            which = f"{self.model_name} {job_ids!r}"
        raise DbcancelError(
            f"{which}: this Jobs works on the table {table!r} in schema {expected}, but "
            f"this connection finds {table!r} in schema {found}: its search_path changed "
            "under the engine (set per checkout or per request, say). dbcancel cannot "
            "tell the tenants of one engine apart by a search_path that moves, and "
            "refuses rather than act on another tenant's jobs; nothing was changed. Give "
            "each tenant an engine of its own, and a Jobs on each: "
            f"engine.execution_options(schema_translate_map={{None: {found!r}}}), or the "
            f"search_path in the engine's connect options "
            f"(connect_args={{'options': '-csearch_path={found}'}})"
        )

    def _counted(self, result: Any, job_ids: Any, *, worker: bool = False) -> int:
        """The row count of a write, its rows checked when the write returns them."""
        if not self._checked:
            return int(result.rowcount)
        rows = result.all()
        for row in rows[:1]:  # one statement: every row was found in one schema
            self._check(row[-1], job_ids, worker=worker)
        return len(rows)

    # -- Backend ------------------------------------------------------------------------

    def check_id(self, job_id: Any) -> None:
        """Refuse an id whose Python type cannot match the primary key column."""
        check_id_type(self.model_name, self._id_type, job_id)

    def check_filters(self, filters: Mapping[str, Any] | None) -> None:
        """Refuse filters with keys that are not column names, or values of the wrong
        type for their column (see [`dbcancel.backend.FilterRule`][dbcancel.backend.FilterRule])."""
        if filters is None:
            return
        check_filter_keys(self.model_name, filters, self._rules, ", ".join(self.table.c.keys()))
        for name, value in filters.items():
            self._rules[name].check(self.model_name, name, value)

    def _can_match(self, job_id: Any, filters: Mapping[str, Any] | None) -> bool:
        """False when the id or a filter value lies outside its column's range."""
        if job_id is not None and not self._id_rule.can_match(job_id):
            return False
        return all(self._rules[k].can_match(v) for k, v in (filters or {}).items())

    def _where(self, job_id: Any, filters: Mapping[str, Any] | None) -> list[Any]:
        clauses: list[Any] = [] if job_id is None else [self.pk == job_id]
        for name, value in (filters or {}).items():
            column = self.table.c[name]
            if name in self._exact:
                # The plain comparison lets the database use the column's index; the
                # exact one drops what the collation alone would let through.
                value = literal(value, type_=String())
                clauses.append(and_(column == value, exact_text(column) == exact_text(value)))
            else:
                clauses.append(column == value)
        return clauses

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Session | Connection | None = None,
    ) -> int:
        """Run `change` as one `UPDATE ... WHERE status IN (...)`; return the row count."""
        if not self._can_match(job_id, filters):
            return 0
        ident = self._identity or self._identify()
        c = self.table.c
        now = utcnow()
        # MySQL evaluates SET assignments left to right, each seeing the ones before it:
        # the CASEs that read the old status must come before status itself is assigned.
        assignments: list[tuple[Any, Any]] = [
            (c[name], case((c.status.in_([s.value for s in sources]), now), else_=c[name]))
            for name, sources in change.stamp_if_from.items()
        ]
        assignments += [(c[name], now) for name in change.stamp]
        assignments += [(c[name], value) for name, value in change.values.items()]
        assignments += [
            (c[name], func.coalesce(c[name], 0) + 1) for name in change.count if name in c
        ]
        assignments.append((c.status, change.to))
        stmt = (
            update(self.table)
            .where(c.status.in_([s.value for s in change.sources]))
            .where(*self._where(job_id, filters))
            .ordered_values(*assignments)
        )
        if job_id is not None:
            stmt = self._hinted(stmt)
        stmt = self._checking(stmt)
        notify = None
        if self._postgresql and change.to is Status.CANCELLED:
            # Watchers in other processes LISTEN for this; sent only if the UPDATE
            # changed a row, and delivered only when the transaction commits: a
            # payload that names the job is as good as the row, and spares them a poll.
            reason = change.values.get("cancel_reason")
            payload = "*" if job_id is None else cancel_payload(job_id, reason)
            notify = (ident.channel, payload)
        elif self._postgresql and "finished_at" in change.stamp:
            # The job has stopped: wake the wait() calls of other processes.
            notify = (ident.channel, end_payload(job_id))
        if using is not None:
            count = self._counted(using.execute(stmt), job_id)
            if notify is not None and count:
                using.execute(select(func.pg_notify(*notify)))
            return count
        return self._write(stmt, {}, job_id, notify=notify)

    @staticmethod
    def _hinted(stmt: Any) -> Any:
        """`stmt` with InnoDB told to find rows through the primary key.

        InnoDB may reach "id = :id AND status IN (:one)" through the status index (it
        ends in the primary key), locking that index before the row, while a concurrent
        UPDATE of the same row locks the row first: a deadlock. Forcing the primary key
        makes every write by id lock in the same order.
        """
        for dialect in ("mysql", "mariadb"):
            stmt = stmt.with_hint("FORCE INDEX (PRIMARY)", dialect_name=dialect)
        return stmt

    def read(self, job_id: Any, filters: Mapping[str, Any] | None = None) -> JobRow | None:
        """One job's status, cancel reason and finished_at; None when there is no such row."""
        if not self._can_match(job_id, filters):
            return None
        if self._identity is None:
            self._identify()
        stmt = self._read_one
        params: dict[str, Any] = {"job_id": job_id}
        if filters:
            stmt = self._checking(select(*self._columns)).where(*self._where(job_id, filters))
            params = {}
        row = self._read(lambda conn: conn.execute(stmt, params).first())
        if row is None:
            return None
        if self._checked:
            self._check(row[-1], job_id)
        return JobRow(Status(row[0]), row[1], row[2], row[3], row[4])

    def read_many(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """The rows of those `job_ids` that exist, in one query."""
        ids = [i for i in job_ids if self._id_rule.can_match(i)]
        if not ids:
            return {}
        if self._identity is None:
            self._identify()
        rows = self._read(lambda conn: conn.execute(self._read_many, {"job_ids": ids}).all())
        if self._checked and rows:
            self._check(rows[0][-1], ids)
        return _by_id(rows)

    def _read(self, work: Callable[[Connection], _T]) -> _T:
        """Run one read, once more on a fresh connection if the pooled one was dead.

        On PostgreSQL in autocommit, so a poll is one round trip instead of three (BEGIN,
        SELECT, ROLLBACK); psycopg switches autocommit without a round trip. Elsewhere a
        plain connection: MySQL drivers switch isolation with an extra statement.
        """

        def read() -> _T:
            with (
                self.engine.connect() as conn,
                _timeouts.applied(_driver_connection(conn)),
                _unprepared(conn, self._psycopg),
            ):
                try:
                    if self._autocommit_reads:
                        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    return work(conn)
                finally:
                    # Back to the pool (its reset is a round trip too) within the limit.
                    conn.close()

        return run_retried(read, _FAULTS, label=self.model_name, write=False)

    def cancel_times(
        self, job_id: Any
    ) -> tuple[dt.datetime | None, dt.datetime | None, dt.datetime | None] | None:
        """The job's `cancel_requested_at`, `cancel_observed_at` and `finished_at`; None
        when there is no such row. Read for metrics only, when a cancelled job stops."""
        if self._identity is None:
            self._identify()
        c = self.table.c
        stmt = select(c.cancel_requested_at, c.cancel_observed_at, c.finished_at).where(
            self.pk == job_id
        )
        row = self._read(lambda conn: conn.execute(stmt).first())
        return None if row is None else (row[0], row[1], row[2])

    def mark_stopped(self, job_id: Any, observed_at: dt.datetime | None = None) -> None:
        """Stamp `finished_at` where it is still null (and `cancel_observed_at`)."""
        ident = self._identity or self._identify()
        params = {"job_id": job_id, "now": utcnow(), "observed": observed_at}
        notify = (ident.channel, end_payload(job_id)) if self._postgresql else None
        self._write(self._mark_stopped, params, job_id, notify=notify)

    def beat_worker(self, worker_id: str, period: float) -> None:
        """Stamp this process's worker row with the database's clock, and its expiry
        `period` seconds times [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS] later; insert
        the row if it is missing."""
        if self._identity is None:
            self._identify()
        lifetime = beat_lifetime(period) // dt.timedelta(microseconds=1)
        params = {"worker": worker_id, "lifetime": lifetime}

        def work(conn: Connection) -> None:
            sql = self._liveness if self._expiry else self._legacy
            if not self._counted(conn.execute(sql.beat, params), None, worker=True):
                self._counted(conn.execute(sql.add, params), None, worker=True)

        try:
            self._run_liveness(work)
        except DBAPIError as err:
            if self._worker_columns() is not None:
                raise
            raise DbcancelError(
                f"the worker table {WORKER_TABLE!r} is missing beside {self.model_name}'s "
                "table, so no job can run: create it with metadata.create_all() (the "
                "mixin adds it to your metadata), or in a migration with "
                "op.add_cancellation() or op.upgrade_cancellation()"
            ) from err

    def reap(self, stale_after: float, error: str) -> int:
        """Stop the jobs whose worker has not beaten for `stale_after` seconds nor
        within its own expiry (see [`Backend.reap`][dbcancel.backend.Backend.reap])."""
        ident = self._identity or self._identify()

        def work(conn: Connection) -> int:
            sql = self._liveness if self._expiry else self._legacy
            row: Any = conn.execute(self._server_now).one()
            now = row[0]
            if self._checked:
                self._check(row[1], None)
                self._check(row[2], None, worker=True)
            params = {
                "cutoff": now - dt.timedelta(seconds=stale_after),
                "reaped_at": now,
                "error": error,
            }
            count = int(conn.execute(sql.reap, {**params, "now": now}).rowcount)
            conn.execute(sql.forget, params)
            if count and self._postgresql:
                conn.execute(select(func.pg_notify(ident.channel, end_payload(None))))
            return count

        return self._run_liveness(work)

    def _run_liveness(self, work: Callable[[Connection], _T]) -> _T:
        """`work` in a transaction of its own; once more without `expires_at` when
        it failed because the worker table predates that column (then judged by
        `heartbeat_at` alone from now on, and said once per database)."""
        try:
            return self._transaction(work)
        except DBAPIError:
            if not self._expiry:
                raise
            columns = self._worker_columns()
            if columns is None or "expires_at" in columns:
                raise
        self._expiry = False
        warn_old_worker_table(
            self.worker_key,
            f"{WORKER_TABLE!r} beside {self.model_name}'s table",
            "op.upgrade_cancellation() in an Alembic migration (or metadata.create_all() "
            "on a new database)",
        )
        return self._transaction(work)

    def transaction_open(self, using: Session | Connection) -> bool:
        """True while `using` (a caller's Session or Connection) is in a transaction."""
        return bool(using.in_transaction())

    def _worker_columns(self) -> set[str] | None:
        """The names of the worker table's columns; None when there is no such table."""
        try:
            # The schema the statements went to: translated, as SQLAlchemy renders it.
            columns = inspect(self.engine).get_columns(WORKER_TABLE, schema=self._schema)
        except NoSuchTableError:
            return None
        return {str(c["name"]) for c in columns}

    def release(self) -> None:
        """Nothing to give back: connections return to the engine's pool after each use."""

    def listen_directly(self, dsn: str) -> None:
        """Open the listener connection to `dsn` (a libpq URL, from `listen_url`)
        instead of through the engine; polls and writes still use the engine."""
        if not self._postgresql:
            raise ValueError(
                f"listen_url is for PostgreSQL, but {self.model_name}'s engine is "
                f"{self.engine.url.get_backend_name()}; leave listen_url out"
            )
        self._listen_dsn = dsn

    def notify(self, channel: str, payload: str) -> None:
        """Send a notification on `channel` through the engine (the listener's probe)."""
        self._read(lambda conn: conn.execute(select(func.pg_notify(channel, payload))).all())

    def listener(self) -> Listener | None:
        """A listener for this table's cancel notifications (PostgreSQL), else None."""
        if not self._postgresql:
            return None
        if self._listen_dsn is not None:
            from ._pg import PgListener, connect_direct

            # The listener's own psycopg connection, whatever the engine's driver.
            return PgListener(connect_direct(self._listen_dsn), lambda: self.channel)
        if self.engine.dialect.driver != "psycopg":
            raise TypeError(
                f"Jobs(watch=True) on PostgreSQL listens for cancels through psycopg 3, "
                f"but this engine uses {self.engine.dialect.driver}; use a "
                "postgresql+psycopg:// URL (pip install 'dbcancel[postgres]')"
            )
        from ._pg import PgListener, connect_from_engine

        # The channel is the backend's, resolved through the engine (and its
        # schema_translate_map), not on the listener's own raw connection.
        return PgListener(connect_from_engine(self.engine), lambda: self.channel)

    def _write(
        self,
        stmt: Any,
        params: dict[str, Any],
        job_id: Any,
        *,
        notify: tuple[str, str] | None = None,
    ) -> int:
        """Run one write in its own transaction (retried after a deadlock); the row count.

        `notify`: a channel and a payload for `pg_notify`, sent in the same
        transaction when the write changed a row.
        """

        def work(conn: Connection) -> int:
            count = self._counted(conn.execute(stmt, params), job_id)
            if notify is not None and count:
                conn.execute(select(func.pg_notify(*notify)))
            return count

        return self._transaction(work)

    def _transaction(self, work: Callable[[Connection], _T]) -> _T:
        """Run `work` in its own transaction, and again when running it again is safe
        (see [`dbcancel.backend.run_retried`][dbcancel.backend.run_retried]): after a
        deadlock or lock timeout, up to five tries, and after a connection found dead
        (SQLAlchemy has then emptied the pool, so the second try opens a fresh
        connection), once."""

        def transaction() -> _T:
            with (
                self.engine.connect() as conn,
                _timeouts.applied(_driver_connection(conn)),
                _unprepared(conn, self._psycopg),
            ):
                try:
                    with conn.begin():  # committed within the limit, and given back too
                        return work(conn)
                finally:
                    conn.close()

        return run_retried(transaction, _FAULTS, label=self.model_name, retries=_RETRIES)


def _bound_connects(engine: Engine) -> None:
    """Make connections that the runtime's polls and beats open respect their time
    limit (see `dbcancel._timeouts`): a frozen network must not hold them forever in
    the driver's connect. Other connections of the engine open as they always did."""
    if not event.contains(engine, "do_connect", _connect_within):
        event.listen(engine, "do_connect", _connect_within)
    # A limit applied to a connection comes off before another thread can check it out.
    if not event.contains(engine, "checkin", _timeouts.undo_on_checkin):
        event.listen(engine, "checkin", _timeouts.undo_on_checkin)


def _connect_within(dialect: Dialect, record: Any, cargs: Any, cparams: Any) -> Any:
    return _timeouts.connect_within(dialect, cargs, cparams)


@contextlib.contextmanager
def _unprepared(conn: Connection, psycopg: bool) -> Iterator[None]:
    """Run dbcancel's statements on `conn` without server-side prepared statements
    (psycopg 3 prepares a statement after a few runs): safe behind a pooler in
    transaction mode. The connection's own setting is put back afterwards."""
    if not psycopg:
        yield
        return
    driver = conn.connection.dbapi_connection
    before = getattr(driver, "prepare_threshold", None)
    if before is None:
        yield
        return
    driver.prepare_threshold = None  # type: ignore[union-attr]
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # closed meanwhile: nothing to put back
            driver.prepare_threshold = before  # type: ignore[union-attr]


def _driver_connection(conn: Connection) -> Any:
    """The DB-API connection under `conn`, when a round-trip limit applies (else None:
    nothing to look up)."""
    if _timeouts.current() is None:
        return None
    return conn.connection.dbapi_connection


class _Liveness(NamedTuple):
    """The statements of the worker heartbeat and of reap, for one job table."""

    beat: Any
    add: Any
    reap: Any
    forget: Any

    @classmethod
    def build(
        cls, table: Table, workers: Table, checking: Callable[..., Any], *, expiry: bool
    ) -> _Liveness:
        """With `expiry`, beats write `expires_at` and a worker counts as alive until
        it passes; without, for a worker table that predates the column, `stale_after`
        alone judges (and the statements never name the column). `checking` makes the
        beats also say where they found the worker table (see `_checking`)."""
        c, w = table.c, workers.c
        stamps: dict[str, Any] = {"heartbeat_at": server_now()}
        if expiry:
            stamps["expires_at"] = server_expiry(bindparam("lifetime", type_=BigInteger()))
        beat = checking(
            update(workers).where(w.id == bindparam("worker")).values(**stamps), worker=True
        )
        add = checking(
            workers.insert().values(id=bindparam("worker"), started_at=server_now(), **stamps),
            worker=True,
        )
        cutoff = bindparam("cutoff", type_=w.heartbeat_at.type)
        fresh: Any = w.heartbeat_at >= cutoff
        stale: Any = w.heartbeat_at < cutoff
        if expiry:
            # The worker's own promise: MISSED_BEATS of its periods after its last beat.
            reaped_at = bindparam("reaped_at", type_=w.expires_at.type)
            fresh = or_(fresh, w.expires_at >= reaped_at)
            stale = and_(stale, or_(w.expires_at.is_(None), w.expires_at < reaped_at))
        alive = select(w.id).where(w.id == c.worker_id, fresh).exists()
        in_progress = c.status == Status.IN_PROGRESS
        # MySQL assigns left to right, each seeing the ones before: error before status.
        reap = (
            update(table)
            .where(
                c.finished_at.is_(None),
                c.status.in_([Status.IN_PROGRESS.value, Status.CANCELLED.value]),
                or_(
                    and_(c.worker_id.is_not(None), ~alive),
                    and_(
                        c.worker_id.is_(None),
                        func.coalesce(c.heartbeat_at, c.started_at) < cutoff,
                    ),
                ),
            )
            .ordered_values(
                (c.error, case((in_progress, bindparam("error")), else_=c.error)),
                (c.status, case((in_progress, literal(Status.FAILED.value)), else_=c.status)),
                (c.finished_at, bindparam("now", type_=c.finished_at.type)),
            )
        )
        busy = select(c.worker_id).where(c.worker_id == w.id, c.finished_at.is_(None)).exists()
        forget = workers.delete().where(stale, ~busy)
        return cls(beat, add, reap, forget)


def _by_id(rows: Any) -> dict[Any, JobRow]:
    """Rows of (id, status, cancel_reason, finished_at, error, worker_id) as JobRows by id."""
    return {r[0]: JobRow(Status(r[1]), r[2], r[3], r[4], r[5]) for r in rows}


_RETRIES = RETRIES


def _orig(err: BaseException) -> BaseException | None:
    """The driver's exception inside SQLAlchemy's wrapper."""
    orig = getattr(err, "orig", None)
    return orig if isinstance(orig, BaseException) else None


_FAULTS = Faults(
    errors=(DBAPIError,),
    is_dead=lambda err: bool(getattr(err, "connection_invalidated", False)),
    is_transient=lambda err: is_transient_error(_orig(err)),
    describe=lambda err: _orig(err) or err,
)
