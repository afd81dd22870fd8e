"""``DjangoJobs(listen_url=...)``: the listener's own connection, straight to the server,
named at connect time; refused for a non-PostgreSQL alias or a bad value. The recipe
behind a real PgBouncer is tested on the SQLAlchemy side
(tests/integration/test_pgbouncer.py): both build the listener the same way."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connections

from dbcancel.contrib.django import DjangoJobs

from .conftest import JOIN_TIMEOUT, Threads
from .test_watch import Worker, cancel_in_a_child, postgresql_alias, wait_until
from .testapp.models import Analysis


def direct_url(alias: str) -> str:
    entry = connections[alias].settings_dict
    password = f":{entry['PASSWORD']}" if entry["PASSWORD"] else ""
    port = f":{entry['PORT']}" if entry["PORT"] else ""
    return f"postgresql://{entry['USER']}{password}@{entry['HOST']}{port}/{entry['NAME']}"


def test_listen_url_is_refused_on_sqlite_and_for_bad_values() -> None:
    with pytest.raises(ValueError, match="listen_url is for PostgreSQL"):
        DjangoJobs(Analysis, using="default", listen_url="postgresql://u@db:5432/app")
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        DjangoJobs(Analysis, using="default", listen_url="mysql://root@db/app")
    with pytest.raises(TypeError, match="str or a sqlalchemy URL"):
        DjangoJobs(Analysis, using="default", listen_url=["postgresql://u@db/app"])


@postgresql_alias()
def test_with_listen_url_a_cancel_arrives_on_the_direct_listener(
    alias: str, add: Any, threads: Threads
) -> None:
    jobs = DjangoJobs(Analysis, interval=10.0, using=alias, listen_url=direct_url(alias))
    job = add()
    w = Worker(threads, jobs, job)
    wait_until(lambda: jobs.stats().listening, 30, "the direct listener to hear its probe")
    committed_at = cancel_in_a_child(alias, job, "pushed")
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.left_at is not None
    assert w.left_at - committed_at < 3.0  # the interval is 10 s: a notification
    assert jobs.stats().notifications >= 1
