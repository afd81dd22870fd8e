"""A child process in which SQLAlchemy cannot be imported: a Django project without it.

Run by ``test_no_sqlalchemy.py`` as ``python -c PRELUDE JOB JOB JOB``, where the prelude
puts :class:`Blocker` first on ``sys.meta_path`` before anything else is imported, then
runs this module. It imports everything a Django project uses, runs the first job to
completion, cancels the second while a thread runs it, reaps the third (in progress
under a worker that never beat) through ``manage.py dbcancel reap``, checks that nothing
tried to import SQLAlchemy meanwhile, and prints one JSON line with what happened. It
exits non-zero, with the traceback, when anything did.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

PRELUDE = (
    "import sys; from tests.contrib.django.no_sqlalchemy import Blocker, main; "
    "sys.meta_path.insert(0, Blocker()); sys.exit(main(sys.argv[1:]))"
)
"""The ``-c`` program: block SQLAlchemy first, then run :func:`main`."""

# Modules a Django project goes through; none may import SQLAlchemy.
CORE = (
    "dbcancel",
    "dbcancel.backend",
    "dbcancel.checkpoint",
    "dbcancel.errors",
    "dbcancel.jobs",
    "dbcancel.models",
    "dbcancel.registry",
    "dbcancel.runtime",
    "dbcancel.testing",
    "dbcancel._commands",
    "dbcancel._health",
    "dbcancel._identity",
    "dbcancel._liveness",
    "dbcancel._runtime",
    "dbcancel._timeouts",
    "dbcancel.contrib.django",
    "dbcancel.contrib.django.admin",
    "dbcancel.contrib.django.backend",
    "dbcancel.contrib.django.checks",
    "dbcancel.contrib.django.jobs",
    "dbcancel.contrib.django.models",
    "dbcancel.contrib.django.management.commands.dbcancel",
)


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses every import of ``sqlalchemy`` (and its submodules), as if it were not
    installed, and remembers who asked."""

    attempts: ClassVar[list[str]] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] == "sqlalchemy":
            Blocker.attempts.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def main(argv: list[str]) -> int:
    from tests.contrib.django import settings as test_settings

    test_settings.configure_child()
    from django.db import connections

    try:
        out = run([int(a) for a in argv])
    finally:
        connections.close_all()
    assert Blocker.attempts == [], f"something tried to import {Blocker.attempts}"
    # Last, what a Django user sees when reaching for the SQLAlchemy side by mistake:
    # each of these asks for SQLAlchemy, and is refused.
    import dbcancel

    for attempt in (lambda: dbcancel.Jobs(object(), object()), lambda: dbcancel.CancellableMixin):
        try:
            attempt()
        except ImportError as err:
            out.setdefault("import_errors", []).append(str(err))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "sqlalchemy")
    assert "sqlalchemy" not in sys.modules, loaded
    assert loaded == [], loaded
    print(json.dumps(out), flush=True)
    return 0


def run(job_ids: list[int]) -> dict[str, Any]:
    import importlib
    import io

    from django.core.management import call_command

    import dbcancel
    from dbcancel import Cancelled, Status
    from dbcancel.contrib.django import DjangoJobs
    from tests.contrib.django.testapp.models import Analysis

    for name in CORE:
        importlib.import_module(name)
    out: dict[str, Any] = {"version": dbcancel.__version__}

    done, cancelled, lost = job_ids
    jobs = DjangoJobs(Analysis, interval=0.05)
    with jobs.run(done) as cp:
        for _ in range(3):
            cp()
    out["done"] = jobs.wait(done, timeout=30).value

    entered = threading.Event()
    seen: list[str | None] = []

    def worker() -> None:
        try:
            with jobs.run(cancelled) as cp:
                entered.set()
                while True:
                    cp()
        except Cancelled as exc:  # pragma: no cover - run() swallows its own cancel
            seen.append(exc.reason)
        finally:
            entered.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert entered.wait(30)
    out["cancel"] = jobs.cancel(cancelled, reason="no sqlalchemy here")
    out["cancelled"] = jobs.wait(cancelled, timeout=30).value
    thread.join(30)
    out["reason"] = jobs._read(cancelled).cancel_reason

    stdout = io.StringIO()
    call_command(
        "dbcancel", "reap", "--stale-after", "60", "--model", "testapp.Analysis", stdout=stdout
    )
    out["reap_output"] = stdout.getvalue()
    row = jobs._read(lost)
    out["lost"] = [row.status.value, row.error]
    out["statuses"] = sorted(s.value for s in Status)
    return out
