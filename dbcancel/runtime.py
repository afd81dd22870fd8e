"""The process's runtime, as an application sees it: stopping it.

dbcancel runs one background thread per process (the runtime): it polls the running jobs
of every table, listens for PostgreSQL notifications, and beats the process's worker row.
It starts with the first job that needs it and serves every database and table of the
process. An application stops it with [`shutdown`][dbcancel.shutdown] (an
`atexit` hook does it at the interpreter's exit).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from collections.abc import Hashable
from typing import Any

from ._runtime import current_runtime
from .checkpoint import Checkpoint

__all__ = ["EXIT_GRACE", "SHUTDOWN_REASON", "shutdown"]

log = logging.getLogger("dbcancel")

SHUTDOWN_REASON = "shutdown"
"""The cancel reason of the jobs that [`dbcancel.shutdown`][dbcancel.shutdown] (or the
interpreter's exit) stopped."""


def shutdown(timeout: float = 10.0) -> None:
    """Stop dbcancel's work in this process; safe to call more than once.

    Every job still running in this process is cancelled with the reason
    `"shutdown"` (`dbcancel.SHUTDOWN_REASON`; a task-queue worker's warm shutdown,
    which the integrations handle before the process ends, says `"worker shutdown"`):
    its checkpoint raises at its next call, its `on_cancel` callbacks run, and its
    `run()` writes `cancelled` when it ends.
    Then, once those jobs have left `run()` or `timeout` seconds have passed, the
    runtime thread stops and closes its database connections. A later job starts it
    again.

    It also runs when the interpreter exits (an `atexit` hook): jobs still running in
    daemon threads then (a thread pool's, or `submit()`'s under a server's graceful
    restart) end `cancelled`, with that reason, rather than `in_progress` until a
    `reap()` comes; those that did not leave `run()` within `timeout` are stamped
    stopped by the hook, as the interpreter is about to end their threads.
    """
    _shutdown(timeout, exiting=False)


def _shutdown(timeout: float, *, exiting: bool) -> None:
    from .registry import registry

    deadline = time.monotonic() + timeout
    running = registry.everything()
    for _key, entry in running:
        entry.checkpoint._observe(SHUTDOWN_REASON, local=True)
    left: list[tuple[Hashable, Any]] = []
    for key, entry in running:
        remaining = max(0.0, deadline - time.monotonic())
        if not entry.checkpoint._wait_ended(remaining):
            left.append((key, entry))
    if exiting:
        for _key, entry in left:
            _stamp_cancelled(entry.checkpoint)
    elif left:
        log.warning(
            "dbcancel: shutdown(): %d job(s) still running after %gs: %s",
            len(left),
            timeout,
            ", ".join(repr(entry.job_id) for _, entry in left),
        )
    rt = current_runtime()
    if rt is not None:
        rt.stop(max(0.0, deadline - time.monotonic()))


def _stamp_cancelled(cp: Checkpoint) -> None:
    """At exit: write the end of a job whose thread the interpreter is about to end."""
    backend = getattr(cp._source, "_backend", None)
    if backend is None:
        return
    from .backend import cancel_change

    try:
        backend.apply(cancel_change(SHUTDOWN_REASON), job_id=cp.job_id)
        backend.mark_stopped(cp.job_id, cp._seen_at())
    except Exception:
        log.error(
            "dbcancel: at exit, job %r could not be marked cancelled; it stays in progress "
            "until jobs.reap() finds this process's heartbeat stale",
            cp.job_id,
            exc_info=True,
        )


def _at_exit() -> None:
    if current_runtime() is None:
        return  # dbcancel ran nothing in this process
    with contextlib.suppress(Exception):
        _shutdown(EXIT_GRACE, exiting=True)


EXIT_GRACE = 5.0
"""Seconds the exit hook gives running jobs to leave `run()` after cancelling them."""

atexit.register(_at_exit)
