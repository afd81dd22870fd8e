"""``DjangoJobs`` awaited from an async view, served by uvicorn in a child process.

``acancel()``, ``await_()`` and ``astatus()`` from ``testapp.views.cancel_and_wait``: the
view cancels a job that a thread of this process runs, waits until that worker has
stopped, and reads the status; it also probes the server's loop (the largest gap of a
10 ms ticker task while the calls run, against as long a stretch without them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from dbcancel import Cancelled, Status

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT

TRIALS = 3
"""Probes of the server's loop: a call that blocks it shows in every one."""


@pytest.fixture
def server(alias: str) -> Iterator[str]:
    """uvicorn serving the test project on the test database of ``alias``; its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.contrib.django.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-access-log",
        ],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    try:
        url = None
        deadline = time.monotonic() + JOIN_TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url is not None, f"uvicorn did not start: {line!r}"
        drain.start()  # the server's log: read, so that it never blocks on a full pipe
        yield url
    finally:
        proc.terminate()
        proc.wait(JOIN_TIMEOUT)
        if drain.is_alive():
            drain.join(JOIN_TIMEOUT)
        proc.stderr.close()


def post(url: str, **form: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Host": "localhost"},  # an ALLOWED_HOSTS name
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=JOIN_TIMEOUT) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def test_an_async_view_cancels_and_waits_without_blocking_its_loop(
    server, alias, jobs, add, row, threads
):
    answers = []
    for trial in range(TRIALS):
        job = add()
        entered = threading.Event()
        seen: list[str | None] = []

        def worker(job: int = job, entered: threading.Event = entered) -> None:
            with jobs.run(job) as cp:
                entered.set()
                try:
                    while True:
                        cp()
                        time.sleep(0.002)
                except Cancelled as exc:
                    seen.append(exc.reason)  # noqa: B023 - read in this trial
                    raise

        threads.start(worker, name=f"worker-{trial}")
        assert entered.wait(JOIN_TIMEOUT)
        answer = post(f"{server}/testapp/{job}/cancel-and-wait/", reason="from an async view")
        answers.append(answer)
        assert answer["cancelled"] is True
        assert answer["final"] == answer["status"] == "cancelled"
        assert seen == ["from an async view"]
        analysis = row(job)
        assert analysis is not None
        assert analysis.status == Status.CANCELLED
        assert analysis.finished_at is not None  # stopped before the view returned
        if answer["loaded_ms"] <= 2 * answer["control_ms"]:
            break
    threads.join()
    assert answers[-1]["loaded_ms"] <= 2 * answers[-1]["control_ms"], (
        "the server's loop was blocked in every trial: "
        + "; ".join(f"{a['loaded_ms']:.1f} ms vs {a['control_ms']:.1f} ms idle" for a in answers)
    )
