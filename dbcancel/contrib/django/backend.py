"""The Django ORM implementation of dbcancel's backend seam.

`DjangoBackend` does for [`DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs] what
`dbcancel._sqla.SQLAlchemyBackend` does for [`Jobs`][dbcancel.Jobs]: read one or many
jobs, turn one [`dbcancel.backend.Change`][dbcancel.backend.Change] into ONE conditional
`filter(...).update(...)`, stamp stops and heartbeats, and stop the jobs of dead
workers. Checkpoints, the registry and the run/cancel/wait logic are the core's,
unchanged.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import threading
import uuid
from collections.abc import Callable, Collection, Hashable, Mapping
from contextlib import nullcontext
from typing import Any, TypeVar

from django.apps import apps
from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    models,
    transaction,
)
from django.db.models import Case, Exists, F, Func, OuterRef, Q, Value, When
from django.db.models.functions import Coalesce, Now
from django.db.models.lookups import Exact, LessThan
from django.utils import timezone

from dbcancel import _timeouts
from dbcancel._identity import ROUTING_OPTIONS, Identity
from dbcancel._pg import IDENTITY_SQL, channel_name
from dbcancel.backend import (
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
    is_transient_error,
    run_retried,
    warn_old_worker_table,
)
from dbcancel.errors import DbcancelError, UsageError
from dbcancel.models import ERROR_LENGTH, WORKER_TABLE, Status

from .models import Worker, _missing_fields, _wrong_fields

__all__ = ["DjangoBackend", "resolve_model"]

_RETRIES = RETRIES

_T = TypeVar("_T")

_COLUMNS = ("status", "cancel_reason", "finished_at", "error", "worker_id")


def resolve_model(model: Any) -> Any:
    """The model class for `model`: a model class, or an `"app_label.ModelName"` string."""
    if isinstance(model, str):
        try:
            return apps.get_model(model)
        except (LookupError, ValueError) as err:
            raise ValueError(
                f"{model!r} is not an installed model; name it as 'app_label.ModelName' "
                "(and make sure its app is in INSTALLED_APPS)"
            ) from err
    if isinstance(model, type) and issubclass(model, models.Model):
        return model
    raise TypeError(
        f"DjangoJobs needs a Django model class or 'app_label.ModelName', got {model!r}"
    )


_PYTHON_TYPES: tuple[tuple[type, type], ...] = (
    (models.BooleanField, bool),
    (models.IntegerField, int),  # AutoFields and the positive ones included
    (models.AutoField, int),
    (models.UUIDField, uuid.UUID),
    (models.CharField, str),
    (models.TextField, str),
    (models.FloatField, float),
    (models.DecimalField, decimal.Decimal),
    (models.DateTimeField, dt.datetime),
    (models.DateField, dt.date),
)


def _filter_rule(field: Any, connection: Any) -> FilterRule:
    """The values a filter on `field` accepts (a relation: those of its target)."""
    target = field.target_field if field.is_relation else field
    python_type = next((t for cls, t in _PYTHON_TYPES if isinstance(target, cls)), None)
    bounds = None
    if python_type is int:
        try:
            bounds = connection.ops.integer_field_range(target.get_internal_type())
        except KeyError:
            bounds = None
        if bounds is not None and None in bounds:
            bounds = None
    return FilterRule(python_type, bounds)


_NOW_SQL = {
    "postgresql": "SELECT statement_timestamp()",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
}


class _ServerNow(Now):  # type: ignore[misc]
    """Django's `Now()` in UTC on MySQL/MariaDB whatever the session's time zone,
    and with microseconds on SQLite (the format Django stores datetimes in there)."""

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="UTC_TIMESTAMP(6)", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "(STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW') || '000')"
        return self.as_sql(compiler, connection, template=template, **extra)


class _ServerExpiry(Func):  # type: ignore[misc]
    """The database's clock plus `microseconds`: a worker row's `expires_at`.

    The same SQL as the SQLAlchemy side's `server_expiry`; beside `_ServerNow`
    in one statement, both read the same instant.
    """

    def __init__(self, microseconds: int) -> None:
        super().__init__(Value(microseconds), output_field=models.DateTimeField())

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = (
            "(STATEMENT_TIMESTAMP() + CAST(%(expressions)s AS BIGINT) * INTERVAL '1 microsecond')"
        )
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "TIMESTAMPADD(MICROSECOND, %(expressions)s, UTC_TIMESTAMP(6))"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = (
            "(STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW', "
            "PRINTF('%%%%+.6f seconds', %(expressions)s / 1000000.0)) || '000')"
        )
        return self.as_sql(compiler, connection, template=template, **extra)


class _ExactText(Func):  # type: ignore[misc]
    """A string operand in a form that compares exactly, whatever the collation.

    The same SQL as the SQLAlchemy side's `exact_text`: utf8mb4 bytes on
    MySQL/MariaDB, text in the "C" collation on PostgreSQL, the BINARY collation on
    SQLite.
    """

    template = "%(expressions)s"

    def __init__(self, expression: Any) -> None:
        super().__init__(expression, output_field=models.TextField())

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "CAST(CONVERT(%(expressions)s USING utf8mb4) AS BINARY)"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = 'CAST(%(expressions)s AS TEXT) COLLATE "C"'
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "%(expressions)s COLLATE BINARY"
        return self.as_sql(compiler, connection, template=template, **extra)


def _is_transient(err: BaseException) -> bool:
    """True for a deadlock or lock timeout, after which the write may run again."""
    if not isinstance(err, OperationalError):
        return False
    return is_transient_error(err.__cause__ if err.__cause__ is not None else err)


class DjangoBackend:
    """Jobs in one Django model's table, reached through one database alias."""

    def __init__(self, model: Any, using: str) -> None:
        model = resolve_model(model)
        meta = model._meta
        name = model.__name__
        if meta.abstract:
            raise TypeError(f"{name} is abstract; pass the concrete job model to DjangoJobs")
        missing = _missing_fields(model)
        if missing:
            raise TypeError(
                f"{name} lacks the field(s) {', '.join(missing)} that dbcancel needs; "
                "subclass dbcancel.contrib.django.models.CancellableModel (then run "
                "makemigrations)"
            )
        wrong = _wrong_fields(model)
        if wrong:
            raise TypeError(f"{name} cannot store dbcancel's state: {'; '.join(wrong)}")
        owner = meta.get_field("status").model._meta.concrete_model
        if owner is not meta.concrete_model:
            # Multi-table inheritance: the update would touch the parent's table too.
            raise TypeError(
                f"{name} inherits its job fields from {owner.__name__} (multi-table "
                f"inheritance); pass {owner.__name__} to DjangoJobs"
            )
        if not isinstance(using, str) or using not in settings.DATABASES:
            raise ValueError(
                f"using={using!r} is not a database alias; settings.DATABASES has "
                f"{', '.join(map(repr, settings.DATABASES))}"
            )
        self.model = model
        self.alias = using
        self.model_name: str = name
        self.label = f"{name}@{using}"
        self._manager = model._base_manager
        connection = connections[using]
        _refuse_switching_schemas(connection, name, using)
        # Which tables: resolved on first use (see _resolve), never here, so that a
        # DjangoJobs can be built while the database is down.
        self._identity: Identity | None = None
        self._identity_lock = threading.Lock()
        self._id_rule = _filter_rule(meta.pk, connection)
        self._id_type = self._id_rule.python_type
        # Filter names: "pk", each field's name and, for relations, its attname
        # (user_id); a relation's name also takes an instance of the related model.
        self._fields_by_name: dict[str, Any] = {"pk": meta.pk}
        for f in meta.concrete_fields:
            self._fields_by_name[f.name] = f
            self._fields_by_name[f.attname] = f
        self._rules = {
            name: _filter_rule(f, connection) for name, f in self._fields_by_name.items()
        }
        self._related = {f.name: f.related_model for f in meta.concrete_fields if f.is_relation}
        self._fields = ", ".join(f.name for f in meta.concrete_fields)
        self._field_names = frozenset(f.name for f in meta.concrete_fields)
        self._postgresql = connection.vendor == "postgresql"
        self._listen_dsn: str | None = None
        self._hint: Callable[..., Any] | None = None
        self._expiry = True  # until a statement finds the worker table without it
        if connections[using].vendor == "mysql":
            self._hint = _force_primary(connections[using].ops.quote_name(meta.db_table))

    # -- identity ---------------------------------------------------------------------

    @property
    def key(self) -> Hashable:
        """The job table as the database resolves it (see `_resolve`); asks the
        database the first time, then a cached read."""
        return (self._identity or self._identify()).key

    @property
    def worker_key(self) -> Hashable:
        """The worker table of the alias's connections, as the database resolves it."""
        return (self._identity or self._identify()).worker_key

    @property
    def channel(self) -> str:
        """This table's PostgreSQL notification channel."""
        return (self._identity or self._identify()).channel

    def _identify(self) -> Identity:
        """Resolve the tables on the database, once (a failed try is tried again at the
        next use); one round trip, on the calling thread's connection."""
        with self._identity_lock:
            if self._identity is None:
                self._identity = self._read(self._resolve)
            return self._identity

    def _resolve(self) -> Identity:
        """`key` `("django", vendor, server, database, schema, db_table)` and
        `worker_key` `("django", vendor, server, database, worker schema)`.

        `vendor` is the connection's (`postgresql`, `mysql`, `sqlite`: the
        server, whichever ENGINE wraps it); `server` the alias's ``(HOST, PORT,
        routing OPTIONS)`; `database` PostgreSQL's `current_database()``, MySQL's
        `DATABASE()`, the resolved path of the SQLite file (in memory: the alias's
        own); `schema` where the connection's `search_path` finds the table
        (PostgreSQL: the namespace of `to_regclass()`, the current schema while the
        table does not exist; MySQL: the database; SQLite: `main`). The alias's
        connections are the same in every thread, so one answer serves them all: a
        connection that switches schemas per request is refused (when the DjangoJobs
        is built, and by every call).
        """
        connection = connections[self.alias]
        _refuse_switching_schemas(connection, self.model_name, self.alias)
        vendor = connection.vendor
        entry = connection.settings_dict
        options = entry.get("OPTIONS") or {}
        routing = tuple(sorted((k, str(v)) for k, v in options.items() if k in ROUTING_OPTIONS))
        server = (entry.get("HOST") or None, str(entry.get("PORT") or "") or None, routing)
        table = self.model._meta.db_table
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            if vendor == "postgresql":
                cursor.execute(IDENTITY_SQL, [quote(table), quote(Worker._meta.db_table)])
                database, schema, worker_schema = cursor.fetchone()
            elif vendor == "mysql":
                cursor.execute("SELECT DATABASE()")
                database = schema = worker_schema = cursor.fetchone()[0]
            elif vendor == "sqlite":
                cursor.execute("PRAGMA database_list")
                files = {row[1]: row[2] for row in cursor.fetchall()}
                schema = worker_schema = "main"
                file = files.get("main")
                database = os.path.realpath(file) if file else f":memory:{self.alias}"
            else:
                database, schema, worker_schema = entry.get("NAME"), None, None
            self._check_tables(connection, cursor, table)
        return Identity(
            key=("django", vendor, server, database, schema, table),
            worker_key=("django", vendor, server, database, worker_schema),
            schema=schema,
            worker_schema=worker_schema,
            channel=channel_name(str(schema), table),
        )

    def _check_tables(self, connection: Any, cursor: Any, table: str) -> None:
        """Refuse, once and clearly, a job table or worker table that does not exist
        (not migrated yet), rather than let the first statement that needs it fail with
        the driver's error."""
        tables = set(connection.introspection.table_names(cursor))
        missing = [name for name in (table, WORKER_TABLE) if name not in tables]
        if not missing:
            return
        if table in missing:
            label = self.model._meta.app_label
            what = f"the table {table!r} of {self.model_name}"
            if WORKER_TABLE in missing:
                what += f" and the worker table {WORKER_TABLE!r} do not exist"
            else:
                what += " does not exist"
            fix = (
                f"run manage.py migrate (and manage.py makemigrations {label} first if "
                "the model has no migration yet)"
            )
        else:
            what = f"the worker table {WORKER_TABLE!r} does not exist"
            fix = (
                "every process that runs jobs beats its row there, and reap() reads it: "
                "add 'dbcancel.contrib.django' to INSTALLED_APPS and run manage.py migrate"
            )
        raise DbcancelError(f"{what} in database {self.alias!r}: {fix}; nothing was changed")

    # -- Backend ----------------------------------------------------------------------

    def check_id(self, job_id: Any) -> None:
        """Refuse an id whose Python type cannot match the primary key field."""
        check_id_type(self.model_name, self._id_type, job_id)

    def check_filters(self, filters: Mapping[str, Any] | None) -> None:
        """Refuse filters that name no field of the model (lookups such as
        `user__name` included), or whose values have the wrong type for their field
        (see [`dbcancel.backend.FilterRule`][dbcancel.backend.FilterRule]). A relation's
        name (`user`) also takes a saved instance of the related model."""
        if filters is None:
            return
        check_filter_keys(self.model_name, filters, self._rules, self._fields, noun="field")
        for name, value in filters.items():
            self._rules[name].check(self.model_name, name, self._plain(name, value))

    def _plain(self, name: str, value: Any) -> Any:
        """A related model instance given for a relation's name, as its key."""
        related = self._related.get(name)
        if related is not None and isinstance(value, related):
            return value.pk
        return value

    def _can_match(self, job_id: Any, filters: Mapping[str, Any] | None) -> bool:
        """False when the id or a filter value lies outside its column's range."""
        if job_id is not None and not self._id_rule.can_match(job_id):
            return False
        return all(self._rules[k].can_match(self._plain(k, v)) for k, v in (filters or {}).items())

    def _filtered(self, qs: Any, filters: Mapping[str, Any] | None) -> Any:
        """`qs` narrowed to `filters`, strings compared exactly (see _ExactText)."""
        if not filters:
            return qs
        qs = qs.filter(**filters)
        for name, value in filters.items():
            if isinstance(value, str) and self._rules[name].python_type is str:
                qs = qs.filter(Exact(_ExactText(F(name)), _ExactText(Value(value))))
        return qs

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Any = None,
    ) -> int:
        """Run `change` as one `filter(status__in=...).update(...)`; return the row count.

        `using` is the alias of the caller's open `transaction.atomic()` block
        (from `cp.complete(alias)`): the update then joins it, uncommitted.
        """
        if not self._can_match(job_id, filters):
            return 0
        if self._identity is None:
            self._identify()  # refuses a missing table before anything is written
        now = timezone.now()
        updates: dict[str, Any] = {}
        # MySQL/MariaDB evaluate SET assignments left to right, each seeing the ones
        # before it: the CASEs that read the old status must come before status itself.
        # update() keeps the order of its keyword arguments.
        for name, sources in change.stamp_if_from.items():
            updates[name] = Case(
                When(
                    status__in=[s.value for s in sources],
                    then=Value(now, output_field=models.DateTimeField()),
                ),
                default=F(name),
            )
        for name in change.stamp:
            updates[name] = now
        updates.update(change.values)
        for name in change.count:
            if name in self._field_names:
                updates[name] = Coalesce(F(name), 0) + 1
        updates["status"] = change.to.value
        qs = self._manager.using(self.alias).filter(status__in=[s.value for s in change.sources])
        if job_id is not None:
            qs = qs.filter(pk=job_id)
        qs = self._filtered(qs, filters)

        notify = None
        if self._postgresql and change.to is Status.CANCELLED and using is None:
            # As on the SQLAlchemy side: same channel, same payload, sent in the
            # transaction of the change and only when it changed a row, so that the
            # watchers of both ORMs take it as the row itself.
            reason = change.values.get("cancel_reason")
            notify = "*" if job_id is None else cancel_payload(job_id, reason)
        elif self._postgresql and "finished_at" in change.stamp:
            notify = end_payload(job_id)  # the job has stopped: wake remote wait()s
        if notify is not None:
            self.channel  # noqa: B018 - resolved before the transaction opens

        def update() -> int:
            with self._hinted(job_id is not None):
                count = int(qs.update(**updates))
            if notify is not None and count:
                self._notify(notify)
            return count

        if using is not None:
            self._check_caller_transaction(using)
            _refuse_switching_schemas(connections[self.alias], self.model_name, self.alias)
            return update()
        return self._write(update)

    def read(self, job_id: Any, filters: Mapping[str, Any] | None = None) -> JobRow | None:
        """One job's status, cancel reason, finished_at and error; None when there is no
        such row."""
        if not self._can_match(job_id, filters):
            return None
        if self._identity is None:
            self._identify()  # refuses a missing table with a message that says so
        qs = self._filtered(self._manager.using(self.alias).filter(pk=job_id), filters)
        rows = self._read(lambda: list(qs.values_list(*_COLUMNS)[:1]))
        if not rows:
            return None
        status, reason, finished_at, error, worker = rows[0]
        return JobRow(Status(status), reason, finished_at, error, worker)

    def read_many(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """The rows of those `job_ids` that exist, in one query."""
        ids = [i for i in job_ids if self._id_rule.can_match(i)]
        if not ids:
            return {}
        rows = self._manager.using(self.alias).filter(pk__in=ids)
        return {
            pk: JobRow(Status(status), reason, finished_at, error, worker)
            for pk, status, reason, finished_at, error, worker in self._read(
                lambda: list(rows.values_list("pk", *_COLUMNS))
            )
        }

    def cancel_times(
        self, job_id: Any
    ) -> tuple[dt.datetime | None, dt.datetime | None, dt.datetime | None] | None:
        """The job's `cancel_requested_at`, `cancel_observed_at` and `finished_at`; None
        when there is no such row. Read for metrics only, when a cancelled job stops."""
        qs = self._manager.using(self.alias).filter(pk=job_id)
        fields = ("cancel_requested_at", "cancel_observed_at", "finished_at")
        rows = self._read(lambda: list(qs.values_list(*fields)[:1]))
        return tuple(rows[0]) if rows else None

    def mark_stopped(self, job_id: Any, observed_at: dt.datetime | None = None) -> None:
        """Stamp `finished_at` where it is still null, in one committed UPDATE.

        With `observed_at` (when this worker saw the cancel), the same UPDATE sets
        `cancel_observed_at` unless the row already has one (the first observation
        counts). A row already stopped is left as it is.
        """
        qs = self._manager.using(self.alias).filter(pk=job_id, finished_at__isnull=True)
        updates: dict[str, Any] = {"finished_at": timezone.now()}
        if observed_at is not None:
            updates["cancel_observed_at"] = Coalesce(
                F("cancel_observed_at"), Value(observed_at, output_field=models.DateTimeField())
            )

        def update() -> int:
            count = int(qs.update(**updates))
            if count and self._postgresql:
                self._notify(end_payload(job_id))
            return count

        self._write(update)

    def _notify(self, payload: str) -> None:
        """`pg_notify` on this table's channel, in the current transaction."""
        channel = self.channel
        with connections[self.alias].cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])

    def beat_worker(self, worker_id: str, period: float) -> None:
        """Stamp this process's [`Worker`][dbcancel.contrib.django.models.Worker] row with
        the database's clock, and its `expires_at` `period` seconds times
        [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS] later; insert it if it is missing.
        One committed UPDATE while the row exists."""
        workers = Worker.objects.using(self.alias)
        lifetime = beat_lifetime(period)

        def beat() -> None:
            if self._expiry:
                micros = lifetime // dt.timedelta(microseconds=1)
                stamps = {"heartbeat_at": _ServerNow(), "expires_at": _ServerExpiry(micros)}
                if not workers.filter(pk=worker_id).update(**stamps):
                    now = self._server_now()
                    workers.create(
                        id=worker_id, started_at=now, heartbeat_at=now, expires_at=now + lifetime
                    )
            elif not workers.filter(pk=worker_id).update(heartbeat_at=_ServerNow()):
                self._add_old_worker(worker_id)

        try:
            self._liveness_write(beat)
        except DatabaseError as err:
            if self._worker_columns() is not None:
                raise
            raise DbcancelError(
                f"the worker table {WORKER_TABLE!r} is missing in database {self.alias!r}, "
                f"so no {self.model_name} job can run: add 'dbcancel.contrib.django' to "
                "INSTALLED_APPS and run manage.py migrate"
            ) from err

    def _add_old_worker(self, worker_id: str) -> None:
        """Insert a worker row into a table without `expires_at` (the model has the
        field, so `create()` would name it)."""
        connection = connections[self.alias]
        q = connection.ops.quote_name
        now = models.DateTimeField().get_db_prep_value(self._server_now(), connection)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {q(WORKER_TABLE)} ({q('id')}, {q('started_at')}, "
                f"{q('heartbeat_at')}) VALUES (%s, %s, %s)",
                [worker_id, now, now],
            )

    def reap(self, stale_after: float, error: str) -> int:
        """Stop the jobs whose worker is gone (see
        [`Backend.reap`][dbcancel.backend.Backend.reap]).

        ONE UPDATE of the rows not yet stopped, `in_progress` or `cancelled`, whose
        [`Worker`][dbcancel.contrib.django.models.Worker] row is missing, or has not
        beaten for `stale_after` seconds and is past its `expires_at` (null:
        `stale_after` alone), on the database's clock (rows without a worker: whose
        `heartbeat_at`, or `started_at`, is older than `stale_after`): each gets
        `finished_at`; those in progress also become `failed` with `error`. Then, in the
        same transaction, the worker rows gone by the same rule and named by no
        unfinished job of this table are deleted.
        """
        meta = self.model._meta

        def if_running(name: str, value: str) -> Any:
            # A CASE on the old status: `value` for a job in progress, else unchanged.
            return Case(
                When(status=Status.IN_PROGRESS.value, then=Value(value)),
                default=F(name),
                output_field=meta.get_field(name),
            )

        def reap() -> int:
            now = self._server_now()
            cutoff = now - dt.timedelta(seconds=stale_after)
            fresh = Q(heartbeat_at__gte=cutoff)
            stale = Q(heartbeat_at__lt=cutoff)
            if self._expiry:
                # The worker's own promise: MISSED_BEATS of its periods after its last beat.
                fresh |= Q(expires_at__gte=now)
                stale &= Q(expires_at__isnull=True) | Q(expires_at__lt=now)
            alive = Worker.objects.using(self.alias).filter(fresh, pk=OuterRef("worker_id"))
            gone = Q(worker_id__isnull=False) & ~Exists(alive)
            legacy = Q(worker_id__isnull=True) & Q(
                LessThan(Coalesce("heartbeat_at", "started_at"), cutoff)
            )
            # MySQL/MariaDB evaluate SET left to right, each seeing the ones before it:
            # error's CASE must read the old status, so it comes before status (as in
            # apply()); update() keeps the order of its keyword arguments.
            count = int(
                self._manager.using(self.alias)
                .filter(
                    gone | legacy,
                    finished_at__isnull=True,
                    status__in=[Status.IN_PROGRESS.value, Status.CANCELLED.value],
                )
                .update(
                    error=if_running("error", error[:ERROR_LENGTH]),
                    status=if_running("status", Status.FAILED.value),
                    finished_at=now,
                )
            )
            busy = self._manager.using(self.alias).filter(
                worker_id=OuterRef("pk"), finished_at__isnull=True
            )
            Worker.objects.using(self.alias).filter(stale).exclude(Exists(busy)).delete()
            if count and self._postgresql:
                self._notify(end_payload(None))
            return count

        return self._liveness_write(reap)

    def _liveness_write(self, work: Callable[[], _T]) -> _T:
        """`work` as one write; once more without `expires_at` when it failed because
        the worker table predates that column (then judged by `heartbeat_at` alone
        from now on, and said once per database)."""
        try:
            return self._write(work)
        except DatabaseError:
            if not self._expiry:
                raise
            columns = self._worker_columns()
            if columns is None or "expires_at" in columns:
                raise
        self._expiry = False
        warn_old_worker_table(
            self.worker_key,
            f"{WORKER_TABLE!r} in database {self.alias!r}",
            "run manage.py migrate dbcancel",
        )
        return self._write(work)

    def _worker_columns(self) -> set[str] | None:
        """The names of the worker table's columns; None when there is no such table."""
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            if WORKER_TABLE not in connection.introspection.table_names(cursor):
                return None
            description = connection.introspection.get_table_description(cursor, WORKER_TABLE)
        return {str(column.name) for column in description}

    def _server_now(self) -> dt.datetime:
        """The database's clock (SQLite's: the machine's, read by SQLite), aware UTC."""
        conn = connections[self.alias]
        sql = _NOW_SQL.get(conn.vendor, _NOW_SQL["sqlite"])
        with conn.cursor() as cursor:
            cursor.execute(sql)
            value = cursor.fetchone()[0]
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        now: dt.datetime = value.astimezone(dt.UTC)
        return now

    def listener(self) -> Listener | None:
        """A listener for this table's cancel notifications (PostgreSQL), else None.

        Its connection is opened with the alias's own parameters, through psycopg 3,
        outside Django's connection handling (the watcher owns it); refuses Django's
        psycopg2 backend, which cannot be waited on in the same way.
        """
        if not self._postgresql:
            return None
        connection = connections[self.alias]
        if getattr(connection.Database, "__name__", "") != "psycopg":
            raise TypeError(
                f"DjangoJobs(watch=True) on PostgreSQL listens for cancels through "
                f"psycopg 3, but database {self.alias!r} uses "
                f"{getattr(connection.Database, '__name__', '?')}; pip install "
                "'psycopg[binary]' (Django prefers it to psycopg2), or leave watch out "
                "to poll without listening"
            )
        from dbcancel._pg import PgListener, listener_name

        if self._listen_dsn is not None:
            from dbcancel._pg import connect_direct

            return PgListener(
                connect_direct(self._listen_dsn, _listener_params(connection)),
                lambda: self.channel,
            )

        def connect() -> Any:
            import psycopg

            params = connection.get_connection_params()
            # Named at connect time, never with a SET on the session (see dbcancel._pg).
            params["application_name"] = listener_name(params.get("application_name"))
            return psycopg.connect(**params)

        return PgListener(connect, lambda: self.channel)

    keeps_connection = True
    """The runtime thread keeps its Django connection between polls (until idle)."""

    def listen_directly(self, dsn: str) -> None:
        """Open the listener connection to `dsn` (a libpq URL, from `listen_url`)
        instead of with the alias's settings; polls and writes still use the alias."""
        if not self._postgresql:
            raise ValueError(
                f"listen_url is for PostgreSQL, but database {self.alias!r} of "
                f"{self.model_name} is {connections[self.alias].vendor}; leave listen_url out"
            )
        self._listen_dsn = dsn

    def notify(self, channel: str, payload: str) -> None:
        """Send a notification on `channel` through the alias (the listener's probe)."""

        def send() -> None:
            with connections[self.alias].cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])

        self._write(send)

    # -- connections ------------------------------------------------------------------

    def release(self) -> None:
        """Close this thread's connection to the alias, unless this is the main thread.

        Django opens one connection per thread and closes it only at the end of a
        request; a worker thread that ran a job would keep its connection until the
        thread object is collected. A connection inside `transaction.atomic()` is the
        caller's and stays open; a closed one reopens by itself on the next query.
        """
        if threading.current_thread() is threading.main_thread():
            return
        conn = connections[self.alias]
        if not conn.in_atomic_block:
            conn.close()

    # -- internals --------------------------------------------------------------------

    def _write(self, update: Callable[[], _T]) -> _T:
        """Run one write in its own committed transaction, and again when that is safe
        (see [`dbcancel.backend.run_retried`][dbcancel.backend.run_retried]): after a
        deadlock or lock timeout, up to five tries, and after a dead connection (the server
        restarted, or killed it, since this thread last used it), once, on a fresh
        connection."""

        def write() -> _T:
            with self._own_transaction():
                return update()

        return self._retried(write, write=True)

    def _read(self, query: Callable[[], _T]) -> _T:
        """Run one read, once more on a fresh connection if this thread's was dead."""
        return self._retried(query, write=False)

    def _retried(self, work: Callable[[], _T], *, write: bool) -> _T:
        # Whether a failure came from a dead connection depends on the connection the
        # failed try began with, so each try notes it first.
        began: list[Any] = [None]

        def attempt() -> _T:
            connection = connections[self.alias]
            # A few attribute lookups: a wrapper that switched schemas since is refused
            # before anything is sent.
            _refuse_switching_schemas(connection, self.model_name, self.alias)
            began[0] = connection.connection
            if _timeouts.current() is None:
                return work()
            # A round-trip limit (the runtime's polls and beats): on the connection the
            # work will use, opened first if it is not.
            connection.ensure_connection()
            with _timeouts.applied(connection.connection):
                return work()

        faults = Faults(
            errors=(OperationalError, InterfaceError),
            is_dead=lambda err: self._drop_if_dead(began[0]),
            is_transient=_is_transient,
        )
        return run_retried(attempt, faults, label=self.model_name, write=write, retries=_RETRIES)

    def _drop_if_dead(self, before: Any) -> bool:
        """After a failed query: True when it failed because the connection `before`
        (the thread's when the query began) was dead, which is then closed.

        Django reconnects only between requests; a worker thread would keep failing on
        a connection the server closed. When the failed rollback made Django close the
        dead connection, leaving `atomic()` may already have opened a new one: a
        changed connection means the old one died. One inside the caller's atomic block
        is the caller's to handle.
        """
        conn = connections[self.alias]
        if conn.in_atomic_block:
            return False
        current = conn.connection
        if before is not None and current is not None and current is not before:
            return True
        if current is not None and conn.is_usable():
            return False
        conn.close()
        return True

    def _own_transaction(self) -> Any:
        """A transaction that commits when the write is done (`durable=True`).

        Inside the caller's `transaction.atomic()` (`ATOMIC_REQUESTS`, say) a cancel
        would stay invisible to the worker until that block commits, and `wait()`
        after it would wait in vain: refuse with a message that says what to do.
        Django's test cases are let through, as `durable=True` lets them through.
        """
        conn = connections[self.alias]
        blocks = getattr(conn, "atomic_blocks", ())
        if blocks and not getattr(blocks[-1], "_from_testcase", False):
            raise UsageError(
                f"dbcancel commits every status change of {self.model_name} at once, but "
                f"this call is inside transaction.atomic() on {self.alias!r}, so nothing "
                "was changed. Call it "
                "outside the atomic block (with ATOMIC_REQUESTS, decorate the view with "
                "transaction.non_atomic_requests), or defer it with "
                "transaction.on_commit(...)"
            )
        return transaction.atomic(using=self.alias, durable=True)

    def _check_caller_transaction(self, using: Any) -> None:
        if using != self.alias:
            raise ValueError(
                f"cp.complete() on {self.model_name} takes the alias of the open "
                f"transaction.atomic() block, {self.alias!r}; got {using!r}"
            )
        if not connections[self.alias].in_atomic_block:
            raise ValueError(
                f"cp.complete({using!r}) joins the caller's transaction: call it inside "
                f"`with transaction.atomic(using={using!r}):`, where the results are written"
            )

    def _hinted(self, by_id: bool) -> Any:
        """On MySQL/MariaDB, make an update by id go through the primary key.

        InnoDB may reach `id = %s AND status IN (%s)` through the status index (it
        ends in the primary key), locking that index entry before the row, while a
        concurrent update of the same row locks the row first and then needs the index
        entry: a deadlock. The ORM has no index hints, so the hint goes in through
        Django's documented hook for rewriting SQL, `connection.execute_wrapper()`.
        """
        if self._hint is None or not by_id:
            return nullcontext()
        return connections[self.alias].execute_wrapper(self._hint)


def _force_primary(quoted_table: str) -> Callable[..., Any]:
    prefix = f"UPDATE {quoted_table} SET "
    hinted = f"UPDATE {quoted_table} FORCE INDEX (PRIMARY) SET "

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if sql.startswith(prefix):
            sql = hinted + sql[len(prefix) :]
        return execute(sql, params, many, context)

    return wrapper


_SWITCHES_SCHEMAS = ("schema_name", "set_schema", "set_tenant")
"""What a connection that switches schemas per request has: django-tenants' and
django-tenant-schemas' wrappers set `connection.schema_name` (and `tenant`) per
request and `SET search_path` on their cursors."""


def _refuse_switching_schemas(connection: Any, model_name: str, alias: str) -> None:
    """Refuse an alias whose connection moves its search_path per request.

    A DjangoJobs keys its jobs, its watcher and its heartbeat by the table the alias
    reaches, once; its watcher and heartbeat threads open their own connections, which
    such a wrapper points at whatever schema it starts in. dbcancel cannot tell which
    tenant's table a call would reach, and refuses rather than guess.
    """
    found = [name for name in _SWITCHES_SCHEMAS if hasattr(connection, name)]
    if not found:
        return
    kind = f"{type(connection).__module__}.{type(connection).__name__}"
    schema = getattr(connection, "schema_name", None)
    now = "" if schema is None else f", now on schema {schema!r}"
    raise DbcancelError(
        f"DjangoJobs({model_name}) on database {alias!r}: its connection ({kind}{now}) "
        "switches schemas per request, so dbcancel cannot tell which tenant's table a "
        "cancel, a poll or a heartbeat would reach, and refuses rather than act on "
        "another tenant's jobs. Give each tenant schema a database alias of its own in "
        "DATABASES (ENGINE 'django.db.backends.postgresql', OPTIONS "
        "{'options': '-c search_path=<schema>'}) and build one DjangoJobs per alias "
        "(using=...); see the Tenants section of dbcancel's operations docs"
    )


def _listener_params(connection: Any) -> dict[str, Any]:
    """The alias's connection parameters a direct listener connection keeps (its
    TLS and timeouts, say); `listen_url` gives the server, database and user."""
    params = dict(connection.get_connection_params())
    for key in ("host", "port", "dbname", "user", "password", "cursor_factory", "context"):
        params.pop(key, None)
    return params
