"""The end-to-end demo behind `python -m dbcancel demo`.

Several upload sessions each hold a few synthetic video clips on disk; one analysis job per
session walks its clips frame by frame in a thread, calling its checkpoint per frame.
Midway, the user deletes one session the proper way:

```python
jobs.cancel(job_id, reason="session deleted")   # durable once it returns
jobs.wait(job_id, timeout=10)                   # the worker has really stopped
delete_files(...); delete_rows(...)             # only now
```

The others finish. The demo then proves what matters: the deleted session's worker opened
no file and read no frame after the delete began, its job ended `cancelled` (never
`completed`), and the others `completed`. It needs only the standard library and
SQLAlchemy, so it runs on a fresh install.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from sqlalchemy import Engine, MetaData, String, create_engine, delete, event, insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ._commands import format_table
from .checkpoint import Checkpoint
from .errors import Cancelled, DbcancelError
from .jobs import Jobs
from .models import WORKER_TABLE, CancellableMixin, Status

__all__ = ["DemoError", "DemoRow", "format_table", "run_demo"]

FRAME_BYTES = 4096
"""Bytes per synthetic video frame; a clip is a file of 24 to 40 such frames."""
CANCEL_REASON = "session deleted"
"""The reason the demo gives when the user deletes a session."""

_MIDWAY = 0.4  # the share of its frames after which the victim's session is deleted
_WAIT_TIMEOUT = 10.0  # seconds; a worker that has not stopped by then is a bug to report
_TICK = 0.1  # seconds between two redraws of the live display
_PLAIN_EVERY = 1.0  # seconds between two progress lines when the output is not a terminal
_BAR = 20


# -- the host application's models ------------------------------------------------------


class _AnalysisColumns(CancellableMixin):
    """The demo's job table: one analysis of the files of one upload session."""

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)


class _UploadColumns:
    """One uploaded file of a session."""

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column()


class _Models(NamedTuple):
    metadata: MetaData
    table: str
    analysis: type[_AnalysisColumns]
    upload: type[_UploadColumns]


def _declare_models(prefix: str) -> _Models:
    # A fresh DeclarativeBase per run: every run has its own table names (so that a --url
    # database's own tables are never touched), and two runs in one process must not
    # register two classes of the same name in one registry.
    class Base(DeclarativeBase):
        pass

    class Analysis(_AnalysisColumns, Base):
        __tablename__ = f"{prefix}_analysis"

    class Upload(_UploadColumns, Base):
        __tablename__ = f"{prefix}_upload"

    return _Models(Base.metadata, Analysis.__tablename__, Analysis, Upload)


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoRow:
    """How one analysis job of the demo ended; `run_demo` returns one per job."""

    job_id: int
    """The job's primary key."""
    session_id: str
    """The upload session it analysed (`s1`, `s2`, ...)."""
    status: Status
    """Its final status, read from the database (from `jobs.wait()` when deleted)."""
    frames: int
    """Frames the worker processed."""
    total_frames: int
    """Frames in the session's clips."""
    files_opened: int
    """Clips the worker opened."""
    total_files: int
    """Clips in the session."""
    deleted: bool
    """True for the session the user deleted midway."""
    cancel_latency_ms: float | None
    """Milliseconds from `jobs.cancel()` returning to the worker's loop exiting; None when
    the job was not cancelled."""
    touches_after_delete: int
    """File opens and frame reads by the worker after the session's delete began (must be
    0)."""


class DemoError(RuntimeError):
    """A check of the demo failed; `rows` holds what it measured."""

    def __init__(self, message: str, rows: Sequence[DemoRow] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


# -- the worker -------------------------------------------------------------------------


@dataclass
class _Progress:
    """What one worker did, written by its thread and read by the display."""

    job_id: int
    session_id: str
    directory: Path
    files: list[Path]
    total_frames: int
    notify_at: int = 0
    frames: int = 0
    files_opened: int = 0
    state: str = "waiting"
    opens: list[float] = field(default_factory=list)
    last_read: float = -math.inf
    loop_exit: float | None = None
    error: str | None = None
    midway: threading.Event = field(default_factory=threading.Event)


def _analyse(jobs: Jobs, p: _Progress, frame_delay: float, wake: threading.Event) -> None:
    """The analysis worker of one session, run in its own thread."""
    try:
        with jobs.run(p.job_id) as cp:
            p.state = "running"
            try:
                _walk(cp, p, frame_delay, wake)
            finally:
                p.loop_exit = time.perf_counter()
        p.state = "cancelled" if cp.cancelled else "completed"
    except Cancelled:
        p.state = "cancelled"  # before it started: the body never ran
    except Exception as exc:  # reported in the final table, not as a traceback
        p.state = "failed"
        p.error = f"{type(exc).__name__}: {exc}"
    finally:
        wake.set()


def _walk(cp: Checkpoint, p: _Progress, frame_delay: float, wake: threading.Event) -> None:
    """The loop a real app runs: every clip of the session, frame by frame."""
    # The per-frame work below waits, as a call to an analysis server would; on_cancel
    # interrupts that wait at once, as closing the server's socket would.
    interrupted = threading.Event()
    with cp.on_cancel(interrupted.set):
        for path in p.files:
            cp()
            p.opens.append(time.perf_counter())
            p.files_opened += 1
            with path.open("rb") as clip:
                while True:
                    cp()
                    frame = clip.read(FRAME_BYTES)
                    p.last_read = time.perf_counter()
                    if not frame:
                        break
                    hashlib.sha256(frame).digest()  # the CPU part of the analysis
                    interrupted.wait(frame_delay)
                    p.frames += 1
                    if p.frames == p.notify_at:
                        p.midway.set()
                        wake.set()


# -- display ----------------------------------------------------------------------------


class _Display:
    """Progress on `out`: redrawn in place on a terminal, periodic plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        isatty = getattr(out, "isatty", None)
        self.live = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self._drawn = 0  # lines of the live block now on screen, below the cursor's row
        self._block: list[str] = []
        self._last_plain = -math.inf

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def start(self) -> None:
        """Hide the cursor during the live display (restored by `stop`)."""
        if self.live:
            self._write("\x1b[?25l")

    def stop(self) -> None:
        """Leave the last progress block on screen, above what follows; show the cursor."""
        if self.live:
            self._write("\x1b[?25h")
        self._drawn, self._block = 0, []

    def say(self, text: str = "") -> None:
        """Print a line once; on a terminal, above the live block."""
        if self.live and self._drawn:
            # Wipe the block, print the line where it was, draw the block again below.
            self._write(f"\x1b[{self._drawn}F\x1b[J{text}\n")
            self._drawn = 0
            self._draw(self._block)
        else:
            self._write(text + "\n")

    def progress(self, elapsed: float, workers: Sequence[_Progress], final: bool = False) -> None:
        """Show the workers' progress: a redrawn block, or a plain line once per second."""
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            # Wider lines would wrap and break the cursor arithmetic of the redraw.
            self._block = [_live_line(p)[:width] for p in workers]
            self._draw(self._block)
        elif final or elapsed - self._last_plain >= _PLAIN_EVERY:
            self._last_plain = elapsed
            parts = [f"job {p.job_id} {_percent(p):3d}% {p.state}" for p in workers]
            self._write(f"[{elapsed:5.1f}s] " + " | ".join(parts) + "\n")

    def _draw(self, lines: list[str]) -> None:
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self._drawn = len(lines)


def _percent(p: _Progress) -> int:
    return 100 * p.frames // p.total_frames if p.total_frames else 100


def _live_line(p: _Progress) -> str:
    filled = _BAR * p.frames // p.total_frames if p.total_frames else _BAR
    bar = "#" * filled + "." * (_BAR - filled)
    return (
        f"  job {p.job_id:>2}  session {p.session_id:<4} [{bar}] {_percent(p):3d}%  "
        f"{p.frames:>4}/{p.total_frames} frames  {p.files_opened}/{len(p.files)} clips  "
        f"{p.state}"
    )


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.0f} ms"


# -- the demo ---------------------------------------------------------------------------


class _Deletion(NamedTuple):
    cancelled: bool
    status: Status
    cancel_returned: float
    delete_started: float


def _engine(url: str, *, embedded: bool, pool_size: int) -> Engine:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        database = make_url(url).database
        if not database or database == ":memory:" or "mode=memory" in url:
            raise ValueError(
                "the demo's worker threads need a database they can share: a SQLite file "
                "(sqlite:///path.db) or a server, not an in-memory SQLite database"
            )
        # Threads write to one file: wait for its lock instead of failing at once.
        engine = create_engine(url, connect_args={"timeout": 30}, pool_size=pool_size)
        if embedded:

            @event.listens_for(engine, "connect")
            def _wal(dbapi_connection: Any, record: Any) -> None:
                # In WAL mode the workers' polls never wait for another thread's write.
                # Only on the demo's own temporary file: the mode persists in a file.
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size)


def _make_sessions(
    root: Path, count: int, files: int, rng: random.Random
) -> list[tuple[str, Path, list[Path]]]:
    """Write each session's clips (random frames) under `root`."""
    sessions = []
    for i in range(1, count + 1):
        session_id = f"s{i}"
        directory = root / "uploads" / session_id
        directory.mkdir(parents=True)
        paths = []
        for n in range(1, files + 1):
            path = directory / f"clip_{n:02d}.raw"
            path.write_bytes(rng.randbytes(FRAME_BYTES * rng.randint(24, 40)))
            paths.append(path)
        sessions.append((session_id, directory, paths))
    return sessions


def run_demo(
    url: str | None = None,
    *,
    jobs: int = 4,
    files: int = 6,
    interval: float = 0.05,
    frame_delay: float = 0.02,
    seed: int | None = 0,
    out: TextIO | None = None,
) -> list[DemoRow]:
    """Run the demo and return one `DemoRow` per job.

    `url` is a SQLAlchemy database URL; by default an embedded SQLite file in a
    temporary folder. On any database the demo creates its own two tables, named
    `dbcancel_demo_<random>_analysis` and `..._upload`, and drops them at the end;
    it never reads or writes other tables. `jobs` sessions of `files` clips each are
    analysed, one job per session; `interval` is the checkpoints' poll interval and
    `frame_delay` the seconds of simulated work per frame (the defaults run for about
    five seconds). Progress goes to `out` (default `sys.stdout`): redrawn in place on
    a terminal, plain periodic lines otherwise.

    Raises `DemoError` (after printing the final table) when a check fails: the
    deleted session's job did not end cancelled, its worker touched a file after the
    delete began, or another job did not complete. On Ctrl-C it cancels every job,
    waits for the workers to stop, cleans up and re-raises `KeyboardInterrupt`.
    """
    if jobs < 1 or files < 1:
        raise ValueError(f"the demo needs at least one job and one file, got {jobs=}, {files=}")
    if not interval > 0:
        raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
    if not frame_delay >= 0:
        raise ValueError(f"frame_delay must be a number of seconds >= 0, got {frame_delay!r}")
    display = _Display(sys.stdout if out is None else out)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="dbcancel-demo-") as name:
        tmp = Path(name)
        embedded = url is None
        if url is None:
            url = f"sqlite:///{tmp / 'demo.db'}"
        # Workers and the display hold connections at the same time.
        engine = _engine(url, embedded=embedded, pool_size=jobs + 2)
        try:
            models = _declare_models(f"dbcancel_demo_{uuid.uuid4().hex[:8]}")
            models.metadata.create_all(engine)
            where = (
                f"embedded SQLite in {tmp}"
                if embedded
                else make_url(url).render_as_string(hide_password=True)
            )
            try:
                return _run(
                    engine, models, display, rng, tmp, where, jobs, files, interval, frame_delay
                )
            finally:
                if not embedded:
                    # Its own tables only: the worker table is shared with the app's jobs.
                    own = [t for t in models.metadata.sorted_tables if t.name != WORKER_TABLE]
                    models.metadata.drop_all(engine, tables=own)
        finally:
            # Before the folder goes: SQLite's file must be closed first on Windows.
            engine.dispose()


def _run(
    engine: Engine,
    models: _Models,
    display: _Display,
    rng: random.Random,
    tmp: Path,
    where: str,
    n_jobs: int,
    n_files: int,
    interval: float,
    frame_delay: float,
) -> list[DemoRow]:
    Analysis, Upload = models.analysis, models.upload
    jobs = Jobs(engine, Analysis, interval=interval)
    sessions = _make_sessions(tmp, n_jobs, n_files, rng)
    workers: list[_Progress] = []
    with engine.begin() as conn:
        for session_id, directory, paths in sessions:
            conn.execute(
                insert(Upload),
                [
                    {"session_id": session_id, "path": str(p), "size": p.stat().st_size}
                    for p in paths
                ],
            )
            result = conn.execute(insert(Analysis).values(user_id="demo", session_id=session_id))
            key = result.inserted_primary_key
            assert key is not None  # None only for executemany
            job_id = int(key[0])
            total = sum(p.stat().st_size for p in paths) // FRAME_BYTES
            workers.append(_Progress(job_id, session_id, directory, paths, total))
    victim = workers[min(1, len(workers) - 1)]
    victim.notify_at = max(1, math.ceil(victim.total_frames * _MIDWAY))

    display.say(f"dbcancel demo: {n_jobs} analysis jobs, one per upload session of {n_files} clips")
    display.say(f"database: {where}, table {models.table}")
    display.say(
        f"checkpoint per frame, poll interval {interval} s; "
        f"session {victim.session_id} is deleted at {int(_MIDWAY * 100)}% of its frames"
    )
    display.say()

    wake = threading.Event()
    threads = [
        threading.Thread(
            target=_analyse,
            args=(jobs, p, frame_delay, wake),
            name=f"analysis-{p.job_id}",
            daemon=True,
        )
        for p in workers
    ]
    t0 = time.perf_counter()
    deletion: _Deletion | None = None
    display.start()
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if deletion is None and victim.midway.is_set():
                deletion = _delete_session(jobs, engine, models, victim, display)
            display.progress(time.perf_counter() - t0, workers)
            # Paces the display; a worker reaching the victim's midpoint or finishing
            # wakes it early.
            wake.wait(_TICK)
            wake.clear()
        if deletion is None:
            # The victim finished before reaching its midpoint (tiny sessions): the user
            # still deletes the session, and the checks below report it.
            deletion = _delete_session(jobs, engine, models, victim, display)
        display.progress(time.perf_counter() - t0, workers, final=True)
    except KeyboardInterrupt:
        display.say("interrupted: cancelling every job and waiting for the workers to stop")
        for p in workers:
            with suppress(DbcancelError):  # the deleted session's row is gone
                jobs.cancel(p.job_id, reason="demo interrupted")
        for p in workers:
            # Its files are deleted on the way out: wait until no worker can read them.
            with suppress(DbcancelError, TimeoutError):
                jobs.wait(p.job_id, timeout=_WAIT_TIMEOUT)
        raise
    finally:
        display.stop()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return _report(jobs, workers, victim, deletion, display, elapsed)


def _delete_session(
    jobs: Jobs, engine: Engine, models: _Models, victim: _Progress, display: _Display
) -> _Deletion:
    """What the app's "delete session" request does: cancel, wait, then delete."""
    sid = victim.session_id
    display.say(
        f"user deletes session {sid} (job {victim.job_id} at {_percent(victim)}% of its "
        f"frames): cancel, wait, then delete"
    )
    t_call = time.perf_counter()
    cancelled = jobs.cancel(victim.job_id, reason=CANCEL_REASON)
    t_returned = time.perf_counter()
    display.say(f"  jobs.cancel({victim.job_id}) -> {cancelled}: the cancel is committed")
    try:
        status = jobs.wait(victim.job_id, timeout=_WAIT_TIMEOUT)
    except TimeoutError as exc:
        # The whole point: never delete files under a worker that may still read them.
        raise DemoError(f"{exc}; the session's files were not deleted") from None
    t_stopped = time.perf_counter()
    display.say(f"  jobs.wait({victim.job_id}) -> {status.value}: its worker has stopped")
    display.say(
        f"  the delete waited {_ms(t_stopped - t_call)} for that: the cancel's commit, "
        f"then the worker's current frame"
    )
    delete_started = time.perf_counter()
    for path in victim.files:
        path.unlink()
    victim.directory.rmdir()
    Analysis, Upload = models.analysis, models.upload
    with engine.begin() as conn:
        uploads = conn.execute(delete(Upload).where(Upload.session_id == victim.session_id))
        analyses = conn.execute(delete(Analysis).where(Analysis.id == victim.job_id))
        n_uploads, n_analyses = int(uploads.rowcount), int(analyses.rowcount)
    display.say(
        f"  deleted session {sid}: its {len(victim.files)} clip files, their {n_uploads} "
        f"upload rows and its {n_analyses} analysis row"
    )
    return _Deletion(cancelled, status, t_returned, delete_started)


def _report(
    jobs: Jobs,
    workers: list[_Progress],
    victim: _Progress,
    deletion: _Deletion,
    display: _Display,
    elapsed: float,
) -> list[DemoRow]:
    rows: list[DemoRow] = []
    problems: list[str] = []
    for p in workers:
        deleted = p is victim
        status = deletion.status if deleted else jobs.status(p.job_id)
        latency = None
        touches = 0
        if deleted:
            touches = sum(t >= deletion.delete_started for t in p.opens)
            touches += p.last_read >= deletion.delete_started
            if deletion.cancelled and p.loop_exit is not None:
                # The flag flips inside cancel(), so the loop may exit before it returns.
                latency = max(0.0, p.loop_exit - deletion.cancel_returned) * 1000
        rows.append(
            DemoRow(
                job_id=p.job_id,
                session_id=p.session_id,
                status=status,
                frames=p.frames,
                total_frames=p.total_frames,
                files_opened=p.files_opened,
                total_files=len(p.files),
                deleted=deleted,
                cancel_latency_ms=latency,
                touches_after_delete=touches,
            )
        )
        if p.error:
            problems.append(f"job {p.job_id} failed: {p.error}")
        wanted = Status.CANCELLED if deleted else Status.COMPLETED
        if status is not wanted:
            problems.append(f"job {p.job_id} ended {status.value}, expected {wanted.value}")
        if touches:
            problems.append(f"job {p.job_id} touched its files {touches} time(s) after delete")

    display.say()
    table = format_table(
        ["job", "session", "status", "frames", "clips"],
        [
            [
                str(r.job_id),
                r.session_id + (" (deleted)" if r.deleted else ""),
                r.status.value,
                f"{r.frames}/{r.total_frames}",
                f"{r.files_opened}/{r.total_files}",
            ]
            for r in rows
        ],
        right="034",
    )
    for line in table.splitlines():
        display.say(line)
    display.say()
    sid = victim.session_id
    if rows[workers.index(victim)].touches_after_delete:
        display.say(f"session {sid}: its worker touched its files after the delete began!")
    else:
        before = _ms(deletion.delete_started - victim.last_read)
        display.say(f"session {sid}: its worker had stopped before the delete began;")
        display.say(f"  it opened no clip and read no frame after it (last read {before} before)")
    counts = {s: sum(r.status is s for r in rows) for s in Status}
    summary = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    display.say(f"{summary} in {elapsed:.1f} s")
    if problems:
        raise DemoError("; ".join(problems), rows)
    return rows
