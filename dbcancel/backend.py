"""The seam between dbcancel's logic and an ORM: what a backend implements.

Checkpoints, the registry, heartbeats, the watcher and [`Jobs`][dbcancel.Jobs] speak
only to a [`Backend`][dbcancel.backend.Backend]: read one or many jobs, apply one
[`Change`][dbcancel.backend.Change] as a single conditional UPDATE, stamp a job as stopped,
beat the worker row, reap the jobs of dead workers. dbcancel ships two: SQLAlchemy's (what
`Jobs(engine, Model)` builds) and Django's (what
[`dbcancel.contrib.django.DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs] builds).
Another ORM, or a plain DB-API driver, implements the same few methods and hands its backend
to [`Jobs.from_backend`][dbcancel.Jobs.from_backend]; the helpers here (the change
constructors, the id and filter checks, the notification payloads,
[`run_retried`][dbcancel.backend.run_retried]) are what both shipped backends are written
with. The docs' "Writing a backend" section says what each method must guarantee.
"""

from __future__ import annotations

import datetime as dt
import decimal
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from . import _timeouts
from ._random import rng
from .models import ATTEMPTS_COLUMN, CANCEL_REASON_LENGTH, ERROR_LENGTH, Status, allowed_sources

__all__ = [
    "BACKEND_MEMBERS",
    "ENDED",
    "MISSED_BEATS",
    "RETRIES",
    "WORKER_LOST",
    "Backend",
    "Change",
    "Faults",
    "FilterRule",
    "JobRow",
    "Listener",
    "beat_lifetime",
    "cancel_change",
    "cancel_payload",
    "check_backend",
    "check_filter_keys",
    "check_id_type",
    "complete_change",
    "cut_reason",
    "end_payload",
    "fail_change",
    "integer_bounds",
    "is_transient_error",
    "read_cancel_payload",
    "read_payload",
    "retry_change",
    "row_text",
    "run_retried",
    "start_change",
    "utcnow",
    "warn_old_worker_table",
]

log = logging.getLogger("dbcancel")

_T = TypeVar("_T")


WORKER_LOST = "worker lost"
"""The error text of a job that `jobs.reap()` marked failed: its heartbeat stopped."""


MISSED_BEATS = 3
"""How many of its own heartbeat periods a worker may stay silent before `jobs.reap()`
may count it dead, whatever `stale_after` the reaper passes.

Each beat writes its row's `expires_at`: the beat's time plus this many periods, on the
database's clock ([`beat_lifetime`][dbcancel.backend.beat_lifetime]). A beat comes up to
a tenth of a period late (jitter) and one may fail on a busy database; three periods
cover both."""

_MAX_LIFETIME = dt.timedelta(days=366)


def beat_lifetime(period: float) -> dt.timedelta:
    """How long a beat of a worker beating every `period` seconds keeps it alive:
    [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS] periods, at most a year (a longer one
    would only risk a timestamp past the database's range).

    `beat_worker` writes `expires_at` as the database's now plus this; in SQL, pass it
    as a whole number of microseconds, `lifetime // timedelta(microseconds=1)`.
    """
    seconds = MISSED_BEATS * float(period)
    if not seconds > 0:
        raise ValueError(f"a heartbeat period is a number of seconds > 0, got {period!r}")
    if seconds >= _MAX_LIFETIME.total_seconds():
        return _MAX_LIFETIME
    return dt.timedelta(seconds=seconds)


_warned_old_tables: set[Hashable] = set()
_warned_lock = threading.Lock()


def warn_old_worker_table(worker_key: Hashable, table: str, remedy: str) -> None:
    """Say once per process and worker table (`worker_key`), at WARNING, that the
    worker table `table` lacks `expires_at`, and what adds it (`remedy`).

    A backend that finds the column missing beats and reaps without it rather than
    refuse to run jobs: in a rolling upgrade, processes of the old and the new dbcancel
    share the table until the migration has run, and the old ones never write the
    column. Without it, `stale_after` alone judges every worker, as before.
    """
    with _warned_lock:
        if worker_key in _warned_old_tables:
            return
        _warned_old_tables.add(worker_key)
    log.warning(
        "dbcancel: the worker table %s has no expires_at column (it was made by an "
        "earlier dbcancel): heartbeats go on without it, and reap() judges workers by "
        "stale_after alone, which must then be at least %d heartbeat periods of every "
        "worker. Add the column: %s",
        table,
        MISSED_BEATS,
        remedy,
    )


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime (what every timestamp column stores)."""
    return dt.datetime.now(dt.UTC)


class JobRow(NamedTuple):
    """The columns of one job that the logic needs.

    `worker_id` (the worker that runs or ran the job) serves messages only ("already
    running in worker ..."); a backend that does not read it leaves it None.
    """

    status: Status
    cancel_reason: str | None
    finished_at: dt.datetime | None
    error: str | None = None
    worker_id: str | None = None


def row_text(row: JobRow) -> str | None:
    """What a row says of its status: the cancel reason, or a failed job's error."""
    return row.cancel_reason if row.status is Status.CANCELLED else row.error


@dataclass(frozen=True, slots=True)
class Change:
    """One status transition, described as data.

    A backend turns it into `UPDATE t SET status = :to, <stamp> = now, <values>
    WHERE status IN (:sources) AND <filters>` and returns the row count.
    `stamp_if_from` columns are set to now only when the old status is in the given set
    (a `CASE` evaluated against the old row). `count` columns are incremented
    (`col = COALESCE(col, 0) + 1`) where the table has them, and skipped where it
    does not (the `attempts` counter, which a table made by an earlier dbcancel may
    lack).
    """

    to: Status
    stamp: tuple[str, ...] = ()
    stamp_if_from: Mapping[str, frozenset[Status]] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    count: tuple[str, ...] = ()

    @property
    def sources(self) -> frozenset[Status]:
        """The statuses this change may leave, from the transition table."""
        return allowed_sources(self.to)


def cut_reason(reason: str | None) -> str | None:
    """The reason as the row stores it (at most 255 characters).

    Local observers get the same text, so a cancel reads the same in every process.
    """
    return None if reason is None else reason[:CANCEL_REASON_LENGTH]


def check_id_type(model_name: str, id_type: type | None, job_id: Any) -> None:
    """Raise `TypeError` when `job_id` cannot be an id of type `id_type`.

    Shared by the backends' `check_id`; `id_type` None accepts any non-None value
    except a bool.
    """
    if (
        job_id is None
        or isinstance(job_id, bool)
        or (id_type is not None and not isinstance(job_id, id_type))
    ):
        kind = id_type.__name__ if id_type is not None else "a primary key value"
        raise TypeError(
            f"{model_name} ids are {kind}, got {job_id!r} "
            f"({type(job_id).__name__}); nothing was changed"
        )


def check_filter_keys(
    model_name: str, filters: Any, known: Collection[str], names: str, *, noun: str = "column"
) -> None:
    """Refuse `filters` that are not a mapping of column names, before anything is sent.

    Keys must be strings: a column collection also answers to positions (`{0: ...}`
    would select the first column), and a bool or a float key would do the same.
    `known` are the names a filter may use; `names` lists them for the message,
    which calls them `noun` (Django says "field").
    """
    if not isinstance(filters, Mapping):
        raise TypeError(
            f"where= and cancel_where() filters of {model_name} are a mapping of {noun} "
            f"names to values, got {type(filters).__name__}; nothing was changed"
        )
    for key in filters:
        if not isinstance(key, str):
            raise TypeError(
                f"{model_name} filters name {noun}s by string, got the key {key!r} "
                f"({type(key).__name__}); nothing was changed"
            )
    unknown = sorted(k for k in filters if k not in known)
    if unknown:
        raise ValueError(
            f"{model_name} has no {noun}(s) {', '.join(map(repr, unknown))} to filter "
            f"on; its {noun}s are {names}. Nothing was changed"
        )


@dataclass(frozen=True, slots=True)
class FilterRule:
    """What values a filter on one column accepts, and which of them can match a row.

    `python_type` is the type the column's values have in Python (None when the ORM
    does not say: then any value but None and bools is sent as given). `bounds` is
    the `(lowest, highest)` integer the column can hold, for integer columns. A value
    of the right type outside the bounds can match no row, so callers answer "no such
    row" without sending it: drivers raise on such values (`DataError` on
    PostgreSQL, `OverflowError` from sqlite3), which a web view would turn into a 500.
    """

    python_type: type | None
    bounds: tuple[int, int] | None = None

    def check(self, model_name: str, name: str, value: Any) -> None:
        """Raise `TypeError` when `value` cannot be a value of this column.

        Exact types, because databases convert silently: MySQL compares a string column
        with the number 0 by converting every non-numeric string to 0, so an unchecked
        `{"user_id": 0}` would match everyone's jobs. `None` is refused everywhere:
        an ownership filter built from a missing request value must not match the rows
        that have no owner. Ints are accepted for float and decimal columns.
        """
        wanted = self.python_type
        if value is None or (isinstance(value, bool) and wanted is not bool):
            ok = False
        elif wanted is None:
            ok = True
        elif wanted is float or wanted is decimal.Decimal:
            ok = isinstance(value, wanted | int)
        else:
            ok = isinstance(value, wanted)
        if not ok:
            kind = wanted.__name__ if wanted is not None else "non-None values"
            raise TypeError(
                f"{model_name}.{name} holds {kind}, got {value!r} ({type(value).__name__}) "
                f"in the filter on {name!r}; convert the value first. Nothing was changed"
            )

    def can_match(self, value: Any) -> bool:
        """False for an integer outside the column's range: no row can have it."""
        if self.bounds is None or not isinstance(value, int):
            return True
        low, high = self.bounds
        return low <= value <= high


def integer_bounds(bits: int, *, unsigned: bool = False) -> tuple[int, int]:
    """The range of a `bits`-wide integer column."""
    if unsigned:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def start_change(worker_id: str) -> Change:
    """pending → in_progress, stamping `started_at`, naming the worker process and
    counting the attempt."""
    return Change(
        Status.IN_PROGRESS,
        stamp=("started_at",),
        values={"worker_id": worker_id},
        count=(ATTEMPTS_COLUMN,),
    )


def retry_change(error: str) -> Change:
    """in_progress → pending: the body asked its task queue for a retry.

    Keeps the attempt count and the error that caused the retry (`error`), so that the
    row says why the job runs again; the next start counts the next attempt. Applies
    only to a job still in progress: a job cancelled meanwhile stays cancelled, and its
    retry never runs.
    """
    return Change(Status.PENDING, values={"error": error[:ERROR_LENGTH]})


def complete_change() -> Change:
    """in_progress → completed, stamping `finished_at`."""
    return Change(Status.COMPLETED, stamp=("finished_at",))


def fail_change(error: str) -> Change:
    """in_progress → failed, keeping the error's text and stamping `finished_at`."""
    return Change(Status.FAILED, stamp=("finished_at",), values={"error": error[:ERROR_LENGTH]})


def cancel_change(reason: str | None) -> Change:
    """pending/in_progress → cancelled.

    `finished_at` is stamped only for a pending job: a job in progress has stopped only
    when its worker leaves `run()`.
    """
    return Change(
        Status.CANCELLED,
        stamp=("cancel_requested_at",),
        stamp_if_from={"finished_at": frozenset({Status.PENDING})},
        values={"cancel_reason": cut_reason(reason)},
    )


def cancel_payload(job_id: Any, reason: str | None) -> str:
    """The notification a committed cancel of one job sends: its id and reason, as JSON.

    A cancel that changed several rows (`cancel_where`) sends `"*"` instead.
    """
    return json.dumps([str(job_id), reason])


def read_cancel_payload(payload: str) -> tuple[str, str | None, bool] | None:
    """`(job id, reason, exact)` from a notification; None for `"*"` (poll them all).

    `exact` is False for a bare id, as dbcancel 0.1 sent: it names the job but not the
    reason, so the listener confirms with a poll.
    """
    if payload == "*":
        return None
    try:
        job_id, reason = json.loads(payload)
    except (ValueError, TypeError):
        return payload, None, False
    if not isinstance(job_id, str) or not (reason is None or isinstance(reason, str)):
        return payload, None, False
    return job_id, reason, True


ENDED = "stopped"
"""The third element of an end notification (see [`end_payload`][dbcancel.backend.end_payload])."""


def end_payload(job_id: Any) -> str:
    """The notification a write that stopped a job sends (its end, `finished_at` set):
    `["<id>", null, "stopped"]`; `job_id` None (a reap of several jobs) names `"*"`.

    It wakes the `wait()` calls of other processes at once. A listener of dbcancel 0.2
    reads it as the bare id of no job it runs, and ignores it.
    """
    return json.dumps(["*" if job_id is None else str(job_id), None, ENDED])


def read_payload(payload: str) -> tuple[str, str | None, str | None]:
    """`(kind, job id, reason)` of any notification on a table's channel.

    `kind` is `"cancel"` (a cancel of the named job, with its reason; job id None
    for `"*"`, several jobs: poll them), `"stopped"` (the named job, or every job for
    `"*"`, has stopped) or `"poll"` (a payload that names a job without its reason,
    as dbcancel 0.1 sent: poll to learn more).
    """
    if payload == "*":
        return "cancel", None, None
    try:
        parts = json.loads(payload)
    except (ValueError, TypeError):
        return "poll", payload, None
    if (
        isinstance(parts, list)
        and len(parts) == 3
        and parts[2] == ENDED
        and isinstance(parts[0], str)
    ):
        return ENDED, None if parts[0] == "*" else parts[0], None
    named = read_cancel_payload(payload)
    if named is None:
        return "cancel", None, None
    job_id, reason, exact = named
    return ("cancel" if exact else "poll"), job_id, reason


class Listener(Protocol):
    """A dedicated connection that receives the cancel notifications of one table."""

    @property
    def connected(self) -> bool:
        """True while the connection is open."""

    def connect(self) -> None:
        """Open the connection and start listening; raises when the database is down."""

    def wait(self, timeout: float) -> list[str] | None:
        """Wait up to `timeout` seconds; the payloads that arrived (`[]` if none).

        Returns None when not connected. Raises when the connection breaks (the caller
        closes it and connects again later).
        """

    def close(self) -> None:
        """Close the connection; harmless when it is not open."""


class Backend(Protocol):
    """What dbcancel needs from an ORM. Every method that touches the database runs at
    most one transaction of its own (or joins the caller's, for `using`).

    Hand an implementation to [`Jobs.from_backend`][dbcancel.Jobs.from_backend]. Writes and reads go
    through [`run_retried`][dbcancel.backend.run_retried], the one retry policy the shipped
    backends share.
    """

    @property
    def key(self) -> Hashable:
        """Identifies the table as the database resolves it, so that the jobs of one
        table are found in-process: the server and database, the schema the table is in
        (after whatever maps or search paths the connection applies), and its name. Two
        backends on one table have equal keys; backends on two tables never do (the same
        name in another schema or database is another table: another tenant's).

        It may be a property that asks the database the first time it is read (and
        again after a failed try); dbcancel reads it first when a job is run or
        cancelled, never when a `Jobs` is built. Reads after the first must be cheap:
        every `run()` and `cancel()` makes a few.
        """
        ...

    model_name: str
    """The model's name, for messages."""
    label: str
    """The model and its database (`Analysis@postgresql`), for logs and thread names."""

    def check_id(self, job_id: Any) -> None:
        """Raise `TypeError` when `job_id` cannot be an id of this table."""

    def check_filters(self, filters: Mapping[str, Any] | None) -> None:
        """Raise before anything is sent when `filters` could match rows the caller
        did not mean: `TypeError` for a key that is not a string or a value of
        the wrong type for its column (see [`FilterRule`][dbcancel.backend.FilterRule]),
        `ValueError` for a key that names no column.

        Filters that pass are compared exactly by `apply` and `read`: a string
        matches only the same characters, whatever the column's collation.
        """

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Any = None,
    ) -> int:
        """Apply `change` as one conditional UPDATE and commit; return the row count.

        `job_id=None` applies it to every row matching `filters`. `using` is a
        caller's open transaction (session or connection) to run in, uncommitted. An id
        or filter value outside its column's range matches nothing: 0, with no query.
        A write whose connection turns out dead is run once more on a fresh one, and
        one the database rolled back for a deadlock or a lock timeout again, a few times
        (it is a conditional UPDATE: running it again cannot apply it twice; see
        [`run_retried`][dbcancel.backend.run_retried]).
        """

    def read(self, job_id: Any, filters: Mapping[str, Any] | None = None) -> JobRow | None:
        """One job's row, or None when no row has this id (and matches `filters`);
        None without a query for an id or value outside its column's range."""

    def read_many(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """The rows of those jobs that still exist, by id."""

    def mark_stopped(self, job_id: Any, observed_at: dt.datetime | None = None) -> None:
        """Set `finished_at` to now where it is still null, and commit.

        `observed_at` (when the worker saw the cancel) goes to `cancel_observed_at`
        in the same UPDATE, unless that already holds an earlier value.
        """

    @property
    def worker_key(self) -> Hashable:
        """Identifies the worker table that `beat_worker` and `reap` use, as the
        database resolves it (server, database, schema), like `key`. One process
        beats one row there, whatever the number of its jobs and tables: two backends
        whose statements reach two worker tables must never share it."""
        ...

    def beat_worker(self, worker_id: str, period: float) -> None:
        """Stamp the worker row `worker_id` with the database's clock, and commit.

        `period` is how many seconds apart the process beats now (the shortest
        `heartbeat` of its running jobs): `heartbeat_at` gets the database's now and
        `expires_at` that now plus [`beat_lifetime`][dbcancel.backend.beat_lifetime] of
        `period`, in the same statement, so that a reaper judges the row by the worker's
        own period. Inserts the row when it is missing (the first job of the process, or
        a reap removed it while the process was stalled). One UPDATE while the row
        exists.

        A worker table without `expires_at` (made by an earlier dbcancel) should not
        stop jobs from running: beat `heartbeat_at` alone there, and say once, at
        WARNING, how to add the column.
        """

    def reap(self, stale_after: float, error: str) -> int:
        """Stop the jobs whose worker is gone; return how many, in one conditional UPDATE.

        On the database's clock (`now`): a worker is gone when its row is missing, or
        when it has not beaten since `now - stale_after` AND its `expires_at` is
        null or before `now`; that is, its last beat is older than
        `max(stale_after, MISSED_BEATS * its period)`, and `stale_after` alone judges
        rows without `expires_at`. Rows not yet stopped (`finished_at` null), in progress or
        cancelled, whose worker is gone (rows without a worker: whose `heartbeat_at`,
        or `started_at`, is older than `stale_after`) get `finished_at`; those in
        progress also become failed with `error`; cancelled ones stay cancelled.
        Worker rows that are gone by the same rule and no longer named by an unfinished
        job of this table are deleted in the same transaction.
        """

    def release(self) -> None:
        """The calling thread is done with the database for now (a worker's run ended, an
        executor thread did one round trip): give back what the ORM keeps per thread.
        SQLAlchemy pools connections per engine and keeps nothing: a no-op there."""

    def listener(self) -> Listener | None:
        """A new listener for this table's cancel notifications; None when the database
        has no push (only PostgreSQL has)."""


BACKEND_MEMBERS: tuple[str, ...] = (
    "key",
    "worker_key",
    "model_name",
    "label",
    "check_id",
    "check_filters",
    "apply",
    "read",
    "read_many",
    "mark_stopped",
    "beat_worker",
    "reap",
    "release",
    "listener",
)
"""The attributes and methods of [`Backend`][dbcancel.backend.Backend], which
[`check_backend`][dbcancel.backend.check_backend] looks for."""


def check_backend(backend: Any) -> None:
    """Raise `TypeError` naming what `backend` lacks of [`Backend`][dbcancel.backend.Backend].

    [`Jobs.from_backend`][dbcancel.Jobs.from_backend] calls it, so that a half-written
    backend fails when the `Jobs` is built, not at the first cancel. It runs no
    property: `key` and `worker_key` may ask the database when first read, which
    building a `Jobs` must not do (the database may be down while the application
    starts); their values are checked here only when they are plain attributes.
    """
    missing = [name for name in BACKEND_MEMBERS if not _has_member(backend, name)]
    if missing:
        raise TypeError(
            f"{type(backend).__name__} is not a dbcancel backend: it lacks "
            f"{', '.join(missing)}; implement every member of dbcancel.backend.Backend"
        )
    for name in ("key", "worker_key"):
        value = _static(backend, name)
        if hasattr(type(value), "__get__"):
            continue  # a property: computed, and used, at the first run or cancel
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"{type(backend).__name__}.{name} must be hashable (a tuple of strings, "
                f"say), got {value!r}"
            ) from None


def _static(backend: Any, name: str) -> Any:
    """`backend.name` without running a property: the property itself, then."""
    try:
        return inspect.getattr_static(backend, name)
    except AttributeError:
        return getattr(backend, name)  # a member only __getattr__ knows of


def _has_member(backend: Any, name: str) -> bool:
    try:
        _static(backend, name)
    except AttributeError:
        return False
    return True


# -- one retry policy ---------------------------------------------------------------------

RETRIES = 5
"""How many times a write is tried in all while the database reports a deadlock or a
lock timeout (a dead connection costs one of them)."""

# PostgreSQL: 40P01 deadlock, 40001 serialization failure. MySQL/MariaDB: 1213 deadlock,
# 1205 lock wait timeout.
_PG_TRANSIENT = frozenset({"40P01", "40001"})
_MYSQL_TRANSIENT = frozenset({1213, 1205})


def is_transient_error(driver_error: BaseException | None) -> bool:
    """True when `driver_error`, an exception of a DB-API driver, reports a deadlock or
    serialization failure (PostgreSQL's SQLSTATE 40P01 and 40001, read from psycopg's
    `sqlstate` or psycopg2's `pgcode`) or a deadlock or lock wait timeout
    (MySQL/MariaDB's error 1213 and 1205, the first of its `args`).

    The database has then rolled the transaction back whole, so running it again is safe.
    """
    if driver_error is None:
        return False
    sqlstate = getattr(driver_error, "sqlstate", None) or getattr(driver_error, "pgcode", None)
    if sqlstate in _PG_TRANSIENT:
        return True
    args: Any = getattr(driver_error, "args", ())
    return bool(args) and args[0] in _MYSQL_TRANSIENT


def _no(error: BaseException) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Faults:
    """How [`run_retried`][dbcancel.backend.run_retried] tells a backend's errors apart.

    `errors`: the exception types worth a look (any other propagates at once).
    `is_dead(err)`: True when `err` came from a connection found dead (the server
    restarted, or killed it, while it sat idle); it may close that connection, so that
    the next try opens a fresh one. It is asked once per call at most, before a retry on
    a fresh connection. `is_transient(err)`: True for a deadlock or lock timeout, after
    which the database has rolled the transaction back (see
    [`is_transient_error`][dbcancel.backend.is_transient_error]). `describe(err)`: what the
    log line shows of `err`.
    """

    errors: tuple[type[BaseException], ...]
    is_dead: Callable[[BaseException], bool]
    is_transient: Callable[[BaseException], bool] = _no
    describe: Callable[[BaseException], object] = str


def run_retried(
    work: Callable[[], _T],
    faults: Faults,
    *,
    label: str,
    write: bool = True,
    retries: int = RETRIES,
) -> _T:
    """Run `work` (one transaction of its own), and again when running it again is safe.

    A write (`write=True`) is retried after a deadlock or lock timeout up to
    `retries` tries in all, with a short random pause that grows with each try, and
    once after a dead connection. That is safe because every write dbcancel makes is
    conditional (`WHERE status IN ...`, `WHERE finished_at IS NULL`): a second run
    finds the row already changed and counts 0. A read (`write=False`) is retried only
    after a dead connection, once. The last error propagates. `label` names the table
    in the log lines (`INFO` on the `dbcancel` logger).

    `work` must open and commit its own transaction each time it is called: the retry
    runs it whole. It never runs inside a caller's transaction (`apply(..., using=)`
    runs its statement directly, unretried).
    """
    reconnected = False
    attempts = retries + 1 if write else 2
    for attempt in range(attempts):
        try:
            return work()
        except faults.errors as err:
            if not reconnected and faults.is_dead(err) and not _timeouts.expired():
                reconnected = True
                verb = "reconnecting" if write else "reading again"
                log.info("dbcancel: %s on %s, %s", faults.describe(err), label, verb)
                continue
            if not write or attempt >= retries - 1 or not faults.is_transient(err):
                raise
            log.info("dbcancel: %s on %s, retrying", faults.describe(err), label)
            time.sleep(rng.uniform(0.001, 0.01) * (attempt + 1))
    raise AssertionError("unreachable")
