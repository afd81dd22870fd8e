"""Worker liveness: one row per process in the worker table.

A job's row names the process running it (`worker_id`); that process's row in the
worker table carries the heartbeat. A process running 1,000 jobs of any number of
tables in one database therefore writes ONE row per heartbeat period, and
`jobs.reap()` finds a job's worker dead when its row is stale on the database's clock
(a host whose own clock is off changes nothing).

Every way of running a job goes through `jobs.run()`, which joins the heartbeat of its
database before the job starts and leaves it when the job has stopped. The beats
themselves come from the runtime thread (`dbcancel._runtime`) when it runs, and from
the jobs' own checkpoints in the threadless mode. A forked child gets a worker id of
its own.
"""

from __future__ import annotations

import os
import secrets
import socket

__all__ = ["DEFAULT_HEARTBEAT", "worker_id"]

DEFAULT_HEARTBEAT = 10.0
"""Seconds between two beats of a worker process's row, unless `Jobs` says otherwise."""


def _new_worker_id() -> str:
    host = socket.gethostname()[:200] or "localhost"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


_worker_id = _new_worker_id()


def worker_id() -> str:
    """This process's worker id, `host:pid:token` (a new token after `fork`)."""
    return _worker_id


def _reset_after_fork() -> None:
    global _worker_id
    _worker_id = _new_worker_id()


os.register_at_fork(after_in_child=_reset_after_fork)
