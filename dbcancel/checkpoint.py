"""Checkpoints: the cheap per-item check a worker loop calls.

A [`Checkpoint`][dbcancel.Checkpoint] belongs to one running job. Calling it costs a clock
read and a comparison until a poll is due; then it re-reads the job's row (at most once per
`interval` of its clock). A cancel issued in this process flips it at once, without waiting
for a poll. Cancellation is sticky: once observed, every later call raises.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import threading
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any, ParamSpec, Protocol, Self, TypeVar

from ._health import Health
from .errors import Cancelled, DbcancelError
from .models import JobId, Status

__all__ = ["CallbackHandle", "Checkpoint", "bind_checkpoint", "checkpoint", "current"]

log = logging.getLogger("dbcancel")

_P = ParamSpec("_P")
_R = TypeVar("_R")

# The checkpoints of the jobs running in this context, innermost last. A stack rather
# than one value reset by tokens: runs left out of order (manual __enter__/__exit__)
# must not leave a finished job current.
_current: ContextVar[tuple[Checkpoint, ...]] = ContextVar("dbcancel_checkpoints", default=())


def _push(cp: Checkpoint) -> None:
    _current.set((*_current.get(), cp))


def _pop(cp: Checkpoint) -> None:
    _current.set(tuple(c for c in _current.get() if c is not cp))


DELETED = "deleted"
"""The reason a checkpoint reports when its job's row has disappeared."""

# After a failed poll the next one waits interval * 2**(failures - 1), at most this many
# seconds (or the interval, when that is longer).
MAX_BACKOFF = 5.0


def backoff(interval: float, failures: int) -> float:
    """Seconds to wait before the next poll after `failures` failed polls in a row.

    The one backoff rule of every poller: `interval * 2**(failures - 1)`, at most
    `MAX_BACKOFF` seconds (or the interval, when that is longer).
    """
    return min(interval * 2.0 ** (failures - 1), max(interval, MAX_BACKOFF))


Rows = Mapping[Any, tuple[Status, str | None]]
"""What a poll reads: the status and row text of those job ids that still exist."""


def poll_step(
    read: Callable[[Collection[Any]], Rows],
    health: Health,
    checkpoints: Sequence[Checkpoint],
    *,
    still_polled: Callable[[Checkpoint], bool] | None = None,
) -> Rows:
    """Poll `checkpoints` (of one table) with ONE read; the only poll of dbcancel.

    The threadless checkpoint polls itself through this (a batch of one); the watcher
    thread polls every job it watches through it. On success the table's health is
    told, and each checkpoint takes in its row (a missing row: deleted) unless it is
    cancelled already or `still_polled` says it left meanwhile. On failure the health
    is told, each checkpoint backs off (or, past `max_staleness`, is cancelled
    locally), and the error propagates for the caller to log or swallow.
    """
    try:
        rows = read({cp.job_id for cp in checkpoints})
    except Exception:
        health.failed(checkpoints[0].job_id if len(checkpoints) == 1 else None)
        for cp in checkpoints:
            if not cp._cancelled:
                cp._poll_failed()
        raise
    health.succeeded()
    for cp in checkpoints:
        if cp._cancelled or (still_polled is not None and not still_polled(cp)):
            continue
        status, text = rows.get(cp.job_id, (None, None))
        cp._apply_row(status, text)
    return rows


_RUNNING = "running"


class _Flag(dict[str, None]):
    """A watched checkpoint's flag: holds one key while the job runs.

    A watched checkpoint is `partial(flag.__getitem__, "running")`: while the key is
    there the call is a dict lookup done entirely in C; cancelling removes the key, and
    the lookup falls through to `__missing__`, which raises the job's `Cancelled`.
    """

    __slots__ = ("_checkpoint",)
    _checkpoint: Checkpoint

    def __init__(self) -> None:
        super().__init__({_RUNNING: None})

    def __missing__(self, key: str) -> None:
        raise self._checkpoint._exception()


class _Source(Protocol):
    """What a checkpoint needs from the object that created it (a `Jobs`)."""

    def _poll_rows(self, job_ids: Collection[Any]) -> Rows: ...

    def _runtime_add(self, cp: Checkpoint) -> None: ...

    def _runtime_remove(self, cp: Checkpoint) -> None: ...

    def _beat_due(self) -> None: ...

    def _complete_in(self, job_id: Any, using: Any) -> tuple[Status | None, str | None] | None: ...


class CallbackHandle:
    """Returned by [`Checkpoint.on_cancel`][dbcancel.Checkpoint.on_cancel]; `remove()` or
    `with` unregisters it."""

    __slots__ = ("_checkpoint", "_fn")

    def __init__(self, checkpoint: Checkpoint, fn: Callable[[], object]) -> None:
        self._checkpoint = checkpoint
        self._fn = fn

    def remove(self) -> None:
        """Unregister the callback; harmless when it already ran or was removed."""
        self._checkpoint._remove_callback(self)

    def __enter__(self) -> CallbackHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


class Checkpoint(functools.partial[None]):
    """The cancellation check of one running job; obtained from `jobs.run(job_id)`.

    ```python
    with jobs.run(analysis_id) as cp:
        for path in files:
            cp()              # raises Cancelled once the job is cancelled
            process(path)
    ```

    Calling it raises [`Cancelled`][dbcancel.Cancelled] once the job is cancelled, and
    re-reads the row when a poll is due (at most once per `interval` of the clock).
    Thread-safe: any thread may cancel it; the worker thread calls it.
    """

    # Why a partial: CPython 3.11 calls a partial's function from C, while an instance's
    # Python __call__ goes through a generic slot lookup. That makes the no-poll-due call
    # about 10 % cheaper (77 vs 87 ns here), enough to keep it within 2x of a bare
    # time.monotonic() loop (benchmarks/bench_core.py, row (a)).
    __slots__ = (
        "_callbacks",
        "_calling",
        "_cancelled",
        "_clock",
        "_completed",
        "_completed_in",
        "_due",
        "_enders",
        "_failures",
        "_fenced",
        "_flag",
        "_forked",
        "_health",
        "_interval",
        "_key",
        "_local",
        "_lock",
        "_max_staleness",
        "_observed_at",
        "_ok_at",
        "_owner",
        "_reason",
        "_retried",
        "_served",
        "_source",
        "_stopped",
        "_watched",
        "job_id",
    )

    job_id: JobId
    """The id of the job this checkpoint watches."""
    _callbacks: list[CallbackHandle] | None
    _calling: tuple[threading.Thread, threading.Event] | None
    _cancelled: bool
    _clock: Callable[[], float]
    _completed: bool
    _completed_in: Any
    _due: float
    _enders: list[Callable[[], object]]
    _failures: int
    _fenced: bool
    _flag: _Flag | None
    _forked: int
    _health: Health
    _interval: float
    _key: Hashable
    _local: bool
    _lock: threading.Lock
    _max_staleness: float | None
    _observed_at: dt.datetime | None
    _owner: bool
    _ok_at: float
    _reason: str | None
    _retried: bool
    _served: int
    _source: _Source
    _stopped: threading.Event
    _watched: bool

    def __new__(
        cls,
        source: _Source,
        job_id: JobId,
        *,
        interval: float,
        clock: Callable[[], float],
        key: Hashable = None,
        cancelled: bool = False,
        reason: str | None = None,
        watched: bool = False,
        max_staleness: float | None = None,
        health: Health | None = None,
    ) -> Self:
        """Create the checkpoint of job `job_id`; `jobs.run()` does this for you.

        `watched`: a background watcher polls the row, and calling the checkpoint only
        reads a flag. `max_staleness`: seconds without a successful poll after which
        the job is cancelled locally (fail closed); None keeps it running (fail open).
        """
        flag: _Flag | None = None
        if watched and max_staleness is None:
            # The hot path of the default mode: a dict lookup done entirely in C.
            flag = _Flag()
            self = super().__new__(cls, flag.__getitem__, _RUNNING)
            flag._checkpoint = self
        else:

            def check() -> None:
                # One clock read and one comparison when nothing is due: a poll of its
                # own (threadless), or, for a watched job with max_staleness, the time
                # at which it goes stale unless the runtime polls successfully before.
                if clock() >= self._due:
                    self._slow_check()

            self = super().__new__(cls, check)
        self.job_id = job_id
        self._source = source
        self._interval = interval
        self._clock = clock
        self._key = key
        self._flag = flag
        self._watched = watched
        self._served = 0
        self._forked = 0  # the parent's pid in a forked child
        self._health = health if health is not None else Health("jobs")
        self._max_staleness = max_staleness
        self._lock = threading.Lock()
        self._callbacks = []
        self._calling = None
        self._cancelled = False
        self._completed = False
        self._completed_in = None
        self._fenced = False
        self._local = False
        self._reason = None
        self._retried = False
        self._observed_at = None
        self._failures = 0
        self._stopped = threading.Event()
        self._enders = []
        now = clock()
        self._ok_at = now
        # The clock reading at which the hot path must look closer; -inf once
        # cancelled, so that it needs only one comparison to know it has nothing to do.
        self._due = self._next_due(now)
        # A run that found its job already cancelled is not the job's worker: it writes
        # nothing when it ends, and wait() does not wait for it.
        self._owner = not cancelled
        if cancelled:
            self._observe(reason)
        return self

    def _next_due(self, now: float) -> float:
        """When the hot path must next look closer, after a successful poll at `now`."""
        if self._watched or self._served:
            # Polled by the runtime thread: only staleness is the checkpoint's business.
            return math.inf if self._max_staleness is None else self._ok_at + self._max_staleness
        return now + self._interval

    def _slow_check(self) -> None:
        if self._cancelled:
            raise self._exception()
        if self._watched or self._served:
            self._check_staleness()
        elif self._poll_logged():
            # The database answers: keep this process's worker row fresh too (with no
            # runtime thread, the jobs' own checkpoints do).
            self._source._beat_due()
        if self._cancelled:
            raise self._exception()

    def _check_staleness(self) -> None:
        """A job polled by the runtime thread: cancel it locally once no poll has
        worked for `max_staleness` seconds, whatever the runtime thread is doing (a
        poll may hang on a frozen network: the runtime cannot say so itself)."""
        from ._runtime import runtime

        runtime().ensure_serving()  # a dead runtime thread is started again
        now = self._clock()
        with self._lock:
            stale_at = self._ok_at + self._max_staleness if self._max_staleness else math.inf
            if now < stale_at and not self._cancelled:
                self._due = stale_at
                return
        if now >= stale_at:
            self._observe_stale(now)

    def _observe_stale(self, now: float) -> None:
        self._observe(
            f"no successful poll for {now - self._ok_at:.1f}s "
            f"(max_staleness={self._max_staleness}s)",
            local=True,
        )

    def _poll_logged(self) -> bool:
        """Poll; a database error becomes a retry with backoff, never an exception.

        A failed poll must not kill the job: the database may be back soon. The table's
        `Health` logs the outage once, not once per call or per job. True when it worked.
        """
        try:
            self.poll()
        except Exception:
            return False
        return True

    def _poll_failed(self) -> None:
        """Take in a failed poll: cancel locally when stale, else back off."""
        self._failures += 1
        now = self._clock()
        stale_at = math.inf if self._max_staleness is None else self._ok_at + self._max_staleness
        if now >= stale_at:
            self._observe_stale(now)
            return
        if not (self._watched or self._served):
            self._schedule_next_poll(min(now + backoff(self._interval, self._failures), stale_at))

    def _stale_in(self) -> float:
        """Seconds of the clock until a failing job is cancelled locally (inf: never)."""
        if self._max_staleness is None or self._cancelled:
            return math.inf
        return self._ok_at + self._max_staleness - self._clock()

    def _schedule_next_poll(self, due: float | None = None) -> None:
        with self._lock:
            # Under the lock: a cancel observed by another thread meanwhile keeps _due at
            # -inf, so a stale row read (or a failed read) cannot make the hot path skip it.
            if not self._cancelled and self._flag is None:
                self._due = self._next_due(self._clock()) if due is None else due

    # -- public API -------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once cancellation has been observed; never raises, never polls."""
        return self._cancelled

    @property
    def reason(self) -> str | None:
        """The cancel reason once cancelled (`"deleted"` when the row vanished), else None."""
        return self._reason

    @property
    def interval(self) -> float:
        """Seconds of the clock between two polls of the row."""
        return self._interval

    @property
    def watched(self) -> bool:
        """True when the runtime thread polls the row (the watched mode), False when
        each call polls it when a poll is due (the threadless mode)."""
        return self._watched

    @property
    def observed_at(self) -> dt.datetime | None:
        """When this process observed the cancellation (aware UTC), or None.

        Written to the row's `cancel_observed_at` when the job stops, so that the
        latency from `cancel_requested_at` to here, and on to `finished_at`, can be
        measured in production.
        """
        return self._observed_at

    def poll(self) -> Status:
        """Re-read the row now and return its status (`cancelled` when it was deleted).

        Observes a cancellation (flag, callbacks) but does not raise
        [`Cancelled`][dbcancel.Cancelled]; database errors propagate (and count as a failed
        poll: the next one backs off).
        """
        from . import _timeouts

        # A poll that gets no answer (a frozen network) is abandoned in time for a job
        # with max_staleness to stop when it goes stale.
        bound = min(_timeouts.POLL_TIMEOUT, max(self._stale_in(), 0.1))
        with _timeouts.limit(bound):
            rows = poll_step(self._source._poll_rows, self._health, (self,))
        row = rows.get(self.job_id)
        return Status.CANCELLED if row is None else row[0]

    def _apply_row(self, status: Status | None, text: str | None) -> Status:
        """Take in a freshly read row and schedule the next poll.

        `status` None: the row was deleted. `text` is what the row says of its
        status: the cancel reason, or the error of a failed job.
        """
        self._failures = 0
        self._ok_at = self._clock()
        self._schedule_next_poll()
        if self._retried:
            # Its body asked for a retry and the row went back to pending (a retry may
            # even have started it again): this run is leaving, and writes nothing.
            return Status.PENDING if status is None else status
        if status is None:
            self._observe(DELETED)
            return Status.CANCELLED
        if status is Status.CANCELLED:
            self._observe(text)
        elif status is not Status.IN_PROGRESS and not (
            status is Status.COMPLETED and self._completed
        ):
            self._fence(status, text)
        return status

    def _fence(self, status: Status, text: str | None) -> None:
        """The row left `in_progress` by another hand (`reap()`, an operator's
        UPDATE) while this worker runs: stop it as if cancelled, with that reason.

        Its `run()` then writes nothing but `finished_at` where that is missing:
        the status stays as the other hand left it, and `cp.complete()` refuses.
        """
        reason = status.value if not text else f"{status.value}: {text}"
        with self._lock:
            first = not self._cancelled
        self._observe(reason, fenced=True)
        if first:
            log.warning(
                "dbcancel: job %r is %s, not in progress, although its worker still runs "
                "(reaped, or changed by hand); stopping the worker, which writes no result",
                self.job_id,
                reason,
            )

    def on_cancel(self, fn: Callable[[], object]) -> CallbackHandle:
        """Run `fn()` once when cancellation is observed; at once if it already was.

        Callbacks run in the thread that observes the cancellation first: the worker's
        own thread after a poll, the watcher's thread (its poll, or on PostgreSQL the
        cancel's notification), or the thread calling `jobs.cancel()` in this process,
        so they can close a socket the worker is blocked on. Either way they have run
        when a `jobs.cancel()` of the job in this process returns. An exception in one
        callback
        is logged and does not stop the others. Returns a handle whose `remove()` (or
        `with` block) unregisters `fn`.
        """
        handle = CallbackHandle(self, fn)
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(handle)
                return handle
        interrupt = _run_callback(self.job_id, handle)
        if interrupt is not None:
            raise interrupt
        return handle

    def complete(self, using: Any) -> None:
        """Mark the job completed inside the caller's open transaction `using`.

        `using` is a SQLAlchemy `Session` or `Connection` in which the worker has
        written its results. The status change joins that transaction, so results and
        completion commit together. If the job was cancelled (or deleted) meanwhile,
        raises [`Cancelled`][dbcancel.Cancelled]: the caller's `with session.begin():` then
        rolls the results back, and `jobs.run()` swallows the exception. Raises
        [`InvalidTransition`][dbcancel.InvalidTransition] when the job is neither in
        progress nor cancelled (for example completed twice).
        """
        if self._cancelled:
            raise self._exception()
        refused = self._source._complete_in(self.job_id, using)
        if refused is None:
            self._completed = True
            self._completed_in = using
            return
        status, text = refused
        if status is None or status is Status.CANCELLED:
            self._observe(DELETED if status is None else text)
        else:
            self._fence(status, text)
        raise self._exception()

    async def acomplete(self, using: Any) -> None:
        """[`complete`][dbcancel.Checkpoint.complete] for a job of
        [`AsyncJobs`][dbcancel.AsyncJobs]: `using` is the `AsyncSession` or
        `AsyncConnection` in which the worker wrote its results, inside its transaction.

        ```python
        async with jobs.run(job_id) as cp, sessions.begin() as session:
            session.add(Result(analysis_id=job_id, value=value))
            await cp.acomplete(session)
        ```
        """
        complete = getattr(self._source, "_acomplete", None)
        if complete is None:
            raise TypeError(
                f"cp.acomplete() completes a job of AsyncJobs; job {self.job_id!r} runs "
                "under Jobs: call cp.complete(session). Nothing was changed"
            )
        await complete(self, using)

    def __repr__(self) -> str:
        state = f"cancelled, reason={self._reason!r}" if self._cancelled else "running"
        return f"<Checkpoint job_id={self.job_id!r} {state}>"

    # -- internals --------------------------------------------------------------------

    def _exception(self) -> BaseException:
        if self._forked:
            return DbcancelError(
                f"the checkpoint of job {self.job_id!r} belongs to the process that runs "
                f"the job (pid {self._forked}); this process was forked from it and cannot "
                "see its cancels. Run the child's work in a jobs.run() of its own, or pass "
                "the child a way to stop (a pipe, an event) that the parent's on_cancel "
                "callback triggers"
            )
        exc = Cancelled(self.job_id, self._reason)
        exc._dbcancel_key = self._key  # type: ignore[attr-defined]
        return exc

    def _orphaned(self, parent: int) -> None:
        """This process is a fork of `parent`, where the job runs: from now on every
        call raises (the child never sees the job's cancels), never a silent no-op."""
        self._forked = parent
        self._due = -math.inf
        if self._flag is not None:
            self._flag.clear()

    def _observe(self, reason: str | None, *, local: bool = False, fenced: bool = False) -> None:
        """Record the cancellation (first reason wins) and run the callbacks once.

        `local`: decided in this process, not read from the database (fail-closed after
        `max_staleness`); the row is then told when the job stops. `fenced`: the row
        left `in_progress` by another hand; it is not told anything.
        """
        me = threading.current_thread()
        with self._lock:
            if not self._cancelled:
                self._reason = reason
                self._local = local
                self._fenced = fenced
                self._observed_at = dt.datetime.now(dt.UTC)
                self._cancelled = True
                self._due = -math.inf
                if self._flag is not None:
                    self._flag.clear()
            callbacks, self._callbacks = self._callbacks, None
            calling = self._calling
            if callbacks:
                calling = self._calling = (me, threading.Event())
        if not callbacks:
            # Observed first in another thread: its callbacks are done before this
            # observer (a jobs.cancel(), say) goes on, unless they are what called it.
            if calling is not None and calling[0] is not me:
                calling[1].wait()
            return
        interrupt = None
        try:
            for handle in callbacks:
                interrupt = _run_callback(self.job_id, handle) or interrupt
        finally:
            assert calling is not None
            calling[1].set()
        if interrupt is not None:
            raise interrupt

    # -- the interface of Jobs, JobRun and the watcher ---------------------------------

    @property
    def _decided_here(self) -> bool:
        """True when the cancel was decided in this process (`max_staleness`), not
        read from the database: the row is told when the job stops."""
        return self._local

    def _seen_at(self) -> dt.datetime | None:
        """When the worker saw a cancel, for `cancel_observed_at`; None for a fenced
        job, which was not cancelled but taken away by another hand."""
        return None if self._fenced else self._observed_at

    def _ended(self) -> None:
        """The job's run() has recorded how it ended: wake those waiting for it."""
        self._stopped.set()
        with self._lock:
            enders, self._enders = self._enders, []
        for fn in enders:
            fn()

    def _when_ended(self, fn: Callable[[], object]) -> None:
        """Call `fn()` once the job's run() has recorded how it ended (at once if it
        has), in the thread that ends it: how a coroutine waits for a local job without
        holding a thread (`fn` must only schedule, as `loop.call_soon_threadsafe` does)."""
        with self._lock:
            if not self._stopped.is_set():
                self._enders.append(fn)
                return
        fn()

    def _leaving(self) -> bool:
        """True while the run that started this job has not finished leaving run()."""
        return self._owner and not self._stopped.is_set()

    def _wait_ended(self, timeout: float | None) -> bool:
        """Block until the job's run() has recorded how it ended, at most `timeout`
        seconds; True when it has."""
        return self._stopped.wait(timeout)

    def _serve(self) -> None:
        """Have the runtime thread poll this (threadless) checkpoint until `_unserve`:
        asyncio code must not poll on the event loop. Calls nest."""
        with self._lock:
            self._served += 1
            first = self._served == 1
            if not self._cancelled and self._flag is None:
                self._due = self._next_due(self._clock())
        if first:
            self._source._runtime_add(self)

    def _unserve(self) -> None:
        with self._lock:
            self._served -= 1
            last = self._served == 0
            if last and not self._cancelled and self._flag is None:
                self._due = self._next_due(self._clock())
        if last:
            self._source._runtime_remove(self)

    def _remove_callback(self, handle: CallbackHandle) -> None:
        with self._lock:
            if self._callbacks is not None and handle in self._callbacks:
                self._callbacks.remove(handle)


def _run_callback(job_id: Any, handle: CallbackHandle) -> KeyboardInterrupt | None:
    """Run one callback, isolated: whatever it raises (`SystemExit`, a `Cancelled`,
    anything) is logged with the job and goes no further, so that it can neither stop
    the other callbacks nor end the thread that observed the cancel (the runtime's,
    which serves every job). A `KeyboardInterrupt` in the main thread is returned, for
    the caller to raise once the other callbacks have run: it may be the user's Ctrl-C."""
    try:
        handle._fn()
    except BaseException as exc:
        log.error(
            "dbcancel: on_cancel callback %r of job %r raised %s; it is ignored "
            "(callbacks must not raise)",
            handle._fn,
            job_id,
            type(exc).__name__,
            exc_info=True,
        )
        if isinstance(exc, KeyboardInterrupt) and (
            threading.current_thread() is threading.main_thread()
        ):
            return exc
    return None


def current() -> Checkpoint | None:
    """The checkpoint of the job running in the current context, or None."""
    stack = _current.get()
    return stack[-1] if stack else None


def checkpoint() -> None:
    """Check the job running in the current context; a no-op outside any job.

    Deep code can stop a cancelled job without a checkpoint passed down to it:

    ```python
    def decode(path):
        for chunk in read_chunks(path):
            dbcancel.checkpoint()
            ...
    ```
    """
    stack = _current.get()
    if stack:
        stack[-1]()


def bind_checkpoint(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn`, made to check the job running here now, from whatever thread calls it.

    Threads of a pool do not inherit the context of the code that submits work to them,
    so inside them [`checkpoint`][dbcancel.checkpoint.checkpoint] would find no job and
    do nothing. Wrap what you submit:

    ```python
    with jobs.run(job_id) as cp, ThreadPoolExecutor(4) as pool:
        for _ in pool.map(dbcancel.bind_checkpoint(decode), paths):
            cp()
    ```

    `decode()` (and what it calls) then stops at its next `dbcancel.checkpoint()`
    once the job is cancelled, raising [`Cancelled`][dbcancel.Cancelled] in the pool's
    thread (`pool.map` raises it again in the job's thread). Outside any job it wraps
    nothing: `fn` runs as it is.
    """
    stack = _current.get()
    if not stack:
        return fn

    @functools.wraps(fn)
    def bound(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        token = _current.set(stack)
        try:
            return fn(*args, **kwargs)
        finally:
            _current.reset(token)

    return bound
