"""Start and stop real ``celery worker`` subprocesses for the tests.

Each node runs ``sys.executable -m celery -A tests.contrib.celery.worker_app worker`` (or
the app module given as ``app``) in a session of its own (so that SIGKILL can take its
pool children too), logs to a file, and is ready when its ``worker_ready`` handler has
written ``ready-<name>`` into ``marks``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
BROKER = os.environ.get("DBCANCEL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("DBCANCEL_TEST_REDIS", "redis://127.0.0.1:6379/0")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def close_app(app: Any) -> None:
    """``app.close()``, and the sockets of its Redis result backend if it made one.

    Celery's own close forgets the broker pool only: the backend's pub/sub and pooled
    connections are left to the garbage collector, whose ResourceWarning then fails
    whichever later test of the same pytest worker happens to collect them.
    """
    backend = getattr(app, "_backend", None)
    if backend is not None:
        consumer = getattr(backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
        client = getattr(backend, "client", None)
        if client is not None:
            client.close()
            client.connection_pool.disconnect()
    app.close()


@dataclass
class Node:
    """One worker node: ``name@host``, its pool, the queues it consumes, its process.

    ``app`` is the module ``celery -A`` imports; ``env`` adds variables to its environment.
    """

    name: str
    token: str
    pool: str
    concurrency: int
    queues: list[str]
    db_url: str
    marks: Path
    on_shutdown: str = "cancel"
    app: str = "tests.contrib.celery.worker_app"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.marks / f"worker-{self.name}.log"

    @property
    def hostname(self) -> str:
        """The node name Celery uses (``a-<token>@host``)."""
        return f"{self.name}-{self.token}@{os.uname().nodename}"

    def start(self) -> Node:
        """Start the worker process; :meth:`wait_ready` waits until it consumes."""
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DBCANCEL_CELERY_BROKER": BROKER,
            "DBCANCEL_CELERY_BACKEND": BACKEND,
            "DBCANCEL_CELERY_DB": self.db_url,
            "DBCANCEL_CELERY_MARKS": str(self.marks),
            "DBCANCEL_CELERY_NODE": self.name,
            "DBCANCEL_CELERY_ON_SHUTDOWN": self.on_shutdown,
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-n",
            f"{self.name}-{self.token}@%h",
            "-Q",
            ",".join(self.queues),
            "-P",
            self.pool,
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "-O",
            "fair",
        ]
        if self.pool != "solo":
            cmd += ["-c", str(self.concurrency)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self) -> Node:
        """Block until the node's ``worker_ready`` fired; fail with its log otherwise."""
        assert self.proc is not None
        ready = self.marks / f"ready-{self.name}"
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)
        return self

    def tail(self, lines: int = 60) -> str:
        """The end of the node's log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL the session after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the node's main process and its pool children at once."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Teardown: stop the node if it still runs, and any pool child left behind."""
        if self.proc is None:
            return
        self.terminate()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
