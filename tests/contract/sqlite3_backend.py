"""A third backend, written against the public seam only: the standard library's sqlite3.

:class:`Sqlite3Backend` implements :class:`dbcancel.backend.Backend` with nothing but
``sqlite3`` and the helpers of :mod:`dbcancel.backend`, and :func:`jobs` hands it to
:meth:`dbcancel.Jobs.from_backend`. The contract tests run on it beside the SQLAlchemy
and Django backends: if they pass here, the seam is what a new backend needs.

Timestamps are stored as UTC text, ``YYYY-MM-DD HH:MM:SS.ffffff``, so that comparing
the text compares the times; the database's clock is SQLite's (the machine's, read by
the SQLite library). Every call opens its own connection in autocommit mode and writes
in ``BEGIN IMMEDIATE`` transactions, which take the write lock at once: two writers wait
for each other instead of failing on a lock upgrade.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dbcancel import Jobs
from dbcancel.backend import (
    Change,
    Faults,
    FilterRule,
    JobRow,
    Listener,
    beat_lifetime,
    check_filter_keys,
    check_id_type,
    integer_bounds,
    run_retried,
    utcnow,
)
from dbcancel.errors import DbcancelError
from dbcancel.models import (
    CANCEL_REASON_LENGTH,
    ERROR_LENGTH,
    WORKER_ID_LENGTH,
    WORKER_TABLE,
    Status,
    status_check_sql,
)

__all__ = ["Sqlite3Backend", "create_tables", "from_db", "jobs", "to_db"]

_T = TypeVar("_T")

TIMESTAMPS = (
    "cancel_requested_at",
    "cancel_observed_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
)
"""The job columns that hold times."""

# SQLite's clock in the format the rows store (it has milliseconds: padded to six digits).
NOW_SQL = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def to_db(value: Any) -> Any:
    """A value as the table stores it: aware datetimes as UTC text, statuses as text."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, Status):
        return value.value
    return value


def from_db(value: str | None) -> dt.datetime | None:
    """A stored time as an aware UTC datetime."""
    if value is None:
        return None
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)


def create_tables(path: Path) -> None:
    """The job table ``analysis``, its results and the worker table, as the other
    backends' test models declare them."""
    times = ", ".join(f"{name} TEXT" for name in TIMESTAMPS)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS analysis (
                id INTEGER PRIMARY KEY,
                user_id VARCHAR(64) NOT NULL DEFAULT 'alice',
                session_id VARCHAR(64) NOT NULL DEFAULT 's1',
                status VARCHAR(16) NOT NULL DEFAULT 'pending'
                    CONSTRAINT ck_analysis_status CHECK ({status_check_sql()}),
                {times},
                cancel_reason VARCHAR({CANCEL_REASON_LENGTH}),
                error TEXT,
                worker_id VARCHAR({WORKER_ID_LENGTH}),
                attempts INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS ix_analysis_status ON analysis (status);
            CREATE TABLE IF NOT EXISTS analysis_result (
                id INTEGER PRIMARY KEY,
                analysis_id INTEGER NOT NULL,
                value VARCHAR(64) NOT NULL
            );
            CREATE TABLE IF NOT EXISTS {WORKER_TABLE} (
                id VARCHAR({WORKER_ID_LENGTH}) PRIMARY KEY,
                started_at TEXT NOT NULL,
                heartbeat_at TEXT NOT NULL,
                expires_at TEXT
            );
            """
        )


def _is_locked(err: BaseException) -> bool:
    # SQLite's busy timeout ran out while another connection held the write lock: the
    # statement did nothing, so it may run again.
    return "database is locked" in str(err)


_FAULTS = Faults(
    errors=(sqlite3.OperationalError,),
    # An embedded database has no server to lose: a connection is never found dead.
    is_dead=lambda err: False,
    is_transient=_is_locked,
)


class Sqlite3Backend:
    """The jobs of the ``analysis`` table of one SQLite file, through ``sqlite3``."""

    def __init__(self, path: Path, *, table: str = "analysis", timeout: float = 30) -> None:
        self.path = path
        self.table = table
        self.timeout = timeout
        self.model_name = "Analysis"
        self.label = f"Analysis@sqlite3:{path.name}"
        self.key: Hashable = ("sqlite3", str(path), table)
        self.worker_key: Hashable = ("sqlite3", str(path))
        with closing(self.connect()) as conn:
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        # (cid, name, type, notnull, default, pk)
        self.columns = [row[1] for row in info]
        self._rules = {row[1]: self._rule(row[1], row[2]) for row in info}
        self._id_rule = self._rules["id"]

    @staticmethod
    def _rule(name: str, declared: str) -> FilterRule:
        if name in TIMESTAMPS:
            return FilterRule(dt.datetime)
        if declared.upper() == "INTEGER":
            return FilterRule(int, integer_bounds(64))  # every INTEGER holds 64 bits
        return FilterRule(str)

    def connect(self) -> sqlite3.Connection:
        """A new connection in autocommit mode (transactions are begun explicitly)."""
        return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)

    # -- checks -----------------------------------------------------------------------

    def check_id(self, job_id: Any) -> None:
        """Refuse an id that is not an int (the table's INTEGER primary key)."""
        check_id_type(self.model_name, int, job_id)

    def check_filters(self, filters: Mapping[str, Any] | None) -> None:
        """Refuse filters on unknown columns or with values of the wrong type."""
        if filters is None:
            return
        check_filter_keys(self.model_name, filters, self._rules, ", ".join(self.columns))
        for name, value in filters.items():
            self._rules[name].check(self.model_name, name, value)

    def _can_match(self, job_id: Any, filters: Mapping[str, Any] | None) -> bool:
        if job_id is not None and not self._id_rule.can_match(job_id):
            return False
        return all(self._rules[k].can_match(v) for k, v in (filters or {}).items())

    def _where(self, job_id: Any, filters: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """``AND``-ed conditions for the id and the filters, strings compared exactly."""
        clauses: list[str] = []
        params: list[Any] = []
        if job_id is not None:
            clauses.append("id = ?")
            params.append(job_id)
        for name, value in (filters or {}).items():
            # Names come from the table's own columns (check_filters refused the rest).
            collate = " COLLATE BINARY" if isinstance(value, str) else ""
            clauses.append(f'"{name}" = ?{collate}')
            params.append(to_db(value))
        return " AND ".join(clauses) or "1", params

    # -- the seam ---------------------------------------------------------------------

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Any = None,
    ) -> int:
        """One ``UPDATE ... WHERE status IN (...)``; ``using``: an sqlite3 connection in
        the caller's open transaction."""
        if not self._can_match(job_id, filters):
            return 0
        now = to_db(utcnow())
        sets: list[str] = []
        params: list[Any] = []
        # SQLite evaluates every assignment against the old row, in any order.
        for name, sources in change.stamp_if_from.items():
            marks = ", ".join("?" for _ in sources)
            sets.append(f'"{name}" = CASE WHEN status IN ({marks}) THEN ? ELSE "{name}" END')
            params += [s.value for s in sorted(sources)]
            params.append(now)
        for name in change.stamp:
            sets.append(f'"{name}" = ?')
            params.append(now)
        for name, value in change.values.items():
            sets.append(f'"{name}" = ?')
            params.append(to_db(value))
        for name in change.count:
            sets.append(f'"{name}" = COALESCE("{name}", 0) + 1')
        sets.append("status = ?")
        params.append(change.to.value)
        leaving = sorted(change.sources)
        where, where_params = self._where(job_id, filters)
        sql = (
            f"UPDATE {self.table} SET {', '.join(sets)} "
            f"WHERE status IN ({', '.join('?' for _ in leaving)}) AND {where}"
        )
        params += [s.value for s in leaving] + where_params
        if using is not None:
            if not isinstance(using, sqlite3.Connection) or not using.in_transaction:
                raise ValueError(
                    "cp.complete() on the sqlite3 backend takes the sqlite3 connection of "
                    f"the open transaction the results are written in, got {using!r}"
                )
            return using.execute(sql, params).rowcount
        return self._write(lambda conn: conn.execute(sql, params).rowcount)

    def read(self, job_id: Any, filters: Mapping[str, Any] | None = None) -> JobRow | None:
        """One job's status, cancel reason, finished_at and error."""
        if not self._can_match(job_id, filters):
            return None
        where, params = self._where(job_id, filters)
        sql = f"SELECT status, cancel_reason, finished_at, error FROM {self.table} WHERE {where}"
        row = self._read(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else JobRow(Status(row[0]), row[1], from_db(row[2]), row[3])

    def read_many(self, job_ids: Collection[Any]) -> dict[Any, JobRow]:
        """The rows of those ``job_ids`` that exist, in one query."""
        ids = [i for i in job_ids if self._id_rule.can_match(i)]
        if not ids:
            return {}
        sql = (
            f"SELECT id, status, cancel_reason, finished_at, error FROM {self.table} "
            f"WHERE id IN ({', '.join('?' for _ in ids)})"
        )
        rows = self._read(lambda conn: conn.execute(sql, ids).fetchall())
        return {r[0]: JobRow(Status(r[1]), r[2], from_db(r[3]), r[4]) for r in rows}

    def mark_stopped(self, job_id: Any, observed_at: dt.datetime | None = None) -> None:
        """Stamp ``finished_at`` where it is still null (and ``cancel_observed_at``)."""
        sql = (
            f"UPDATE {self.table} SET finished_at = ?, "
            "cancel_observed_at = COALESCE(cancel_observed_at, ?) "
            "WHERE id = ? AND finished_at IS NULL"
        )
        params = [to_db(utcnow()), to_db(observed_at), job_id]
        self._write(lambda conn: conn.execute(sql, params).rowcount)

    def beat_worker(self, worker_id: str, period: float) -> None:
        """Stamp the worker row with SQLite's clock, and its expiry (``MISSED_BEATS``
        periods later, on the same clock); insert the row when it is missing."""
        seconds = beat_lifetime(period).total_seconds()

        def beat(conn: sqlite3.Connection) -> None:
            # One 'now' per statement: heartbeat_at and expires_at read the same instant.
            expires = "(strftime('%Y-%m-%d %H:%M:%f', 'now', ?) || '000')"
            shift = f"{seconds:+.6f} seconds"
            sql = (
                f"UPDATE {WORKER_TABLE} SET heartbeat_at = {NOW_SQL}, expires_at = {expires} "
                "WHERE id = ?"
            )
            if not conn.execute(sql, [shift, worker_id]).rowcount:
                conn.execute(
                    f"INSERT INTO {WORKER_TABLE} (id, started_at, heartbeat_at, expires_at) "
                    f"VALUES (?, {NOW_SQL}, {NOW_SQL}, {expires})",
                    [worker_id, shift],
                )

        try:
            self._write(beat)
        except sqlite3.OperationalError as err:
            if "no such table" not in str(err):
                raise
            raise DbcancelError(
                f"the worker table {WORKER_TABLE!r} is missing in {self.path}, so no job "
                "can run: create it (create_tables)"
            ) from err

    def reap(self, stale_after: float, error: str) -> int:
        """Stop the jobs whose worker has not beaten for ``stale_after`` seconds and is
        past its own expiry, and forget the worker rows gone by the same rule that no
        unfinished job names."""

        def reap(conn: sqlite3.Connection) -> int:
            now = from_db(conn.execute(f"SELECT {NOW_SQL}").fetchone()[0])
            assert now is not None
            cutoff = to_db(now - dt.timedelta(seconds=stale_after))
            t, w = self.table, WORKER_TABLE
            # A worker is alive while it beat within stale_after OR its expiry is ahead.
            alive = f"({w}.heartbeat_at >= :cutoff OR {w}.expires_at >= :now)"
            count = conn.execute(
                f"UPDATE {t} SET "
                "error = CASE WHEN status = :running THEN :error ELSE error END, "
                "status = CASE WHEN status = :running THEN :failed ELSE status END, "
                "finished_at = :now "
                "WHERE finished_at IS NULL AND status IN (:running, :cancelled) AND ("
                f"(worker_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {w} "
                f"WHERE {w}.id = {t}.worker_id AND {alive})) "
                "OR (worker_id IS NULL AND COALESCE(heartbeat_at, started_at) < :cutoff))",
                {
                    "running": Status.IN_PROGRESS.value,
                    "failed": Status.FAILED.value,
                    "cancelled": Status.CANCELLED.value,
                    "error": error[:ERROR_LENGTH],
                    "now": to_db(now),
                    "cutoff": cutoff,
                },
            ).rowcount
            conn.execute(
                f"DELETE FROM {w} WHERE heartbeat_at < :cutoff "
                "AND (expires_at IS NULL OR expires_at < :now) "
                f"AND NOT EXISTS (SELECT 1 FROM {t} "
                f"WHERE {t}.worker_id = {w}.id AND {t}.finished_at IS NULL)",
                {"cutoff": cutoff, "now": to_db(now)},
            )
            return count

        return self._write(reap)

    def release(self) -> None:
        """Nothing to give back: every call closes the connection it opened."""

    def listener(self) -> Listener | None:
        """None: SQLite has no push; a watcher polls."""
        return None

    # -- transactions -----------------------------------------------------------------

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work`` in a ``BEGIN IMMEDIATE`` transaction of its own, retried by the one
        policy of :func:`dbcancel.backend.run_retried` when the lock wait ran out."""

        def transaction() -> _T:
            with closing(self.connect()) as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
                return result

        return run_retried(transaction, _FAULTS, label=self.model_name)

    def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def read() -> _T:
            with closing(self.connect()) as conn:
                return work(conn)

        return run_retried(read, _FAULTS, label=self.model_name, write=False)


def jobs(path: Path, **options: Any) -> Jobs:
    """``Jobs`` on the ``analysis`` table of the SQLite file ``path``."""
    return Jobs.from_backend(Sqlite3Backend(path), **options)


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """An open ``BEGIN IMMEDIATE`` transaction, committed at the end of the block (rolled
    back on an exception)."""
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
