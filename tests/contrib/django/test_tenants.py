"""Tenants on Django: two database aliases with the same table names are two tables.

``postgresql`` and ``postgresql_tenant`` reach one test database; the second's
connections have a ``search_path`` of their own (``settings.TENANT_SCHEMA``), where this
module creates the test app's job table and the worker table. Job ``N`` runs through
both at once: a cancel, a notification, a heartbeat or a reap through one alias never
touches the other's. A connection that switches schemas per request (django-tenants sets
``connection.schema_name``) cannot be told apart, and is refused.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections

from dbcancel import DbcancelError, Status
from dbcancel._liveness import worker_id
from dbcancel.contrib.django import DjangoJobs
from dbcancel.contrib.django.models import Worker

from . import settings as test_settings
from .testapp.models import Analysis

PUBLIC = test_settings.ALIASES["postgresql"]
TENANT = test_settings.TENANT_ALIAS
NO_BEAT = 600.0
"""A heartbeat period no test lives through: only a job's start beats the worker row."""
BEAT = 0.05
_IDS = itertools.count(10_000)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # polling state that nothing signals


both_aliases = pytest.mark.django_db(transaction=True, databases=[PUBLIC, TENANT])


@pytest.fixture
def tenant() -> Iterator[str]:
    """The tenant alias, its schema and tables created on first use, emptied after."""
    from .conftest import check_reachable

    check_reachable(PUBLIC)
    schema = test_settings.TENANT_SCHEMA
    with connections[PUBLIC].cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    existing = connections[TENANT].introspection.table_names()
    with connections[TENANT].schema_editor() as editor:
        for model in (Analysis, Worker):
            if model._meta.db_table not in existing:
                editor.create_model(model)
    yield TENANT
    # Postgresql's test database is flushed after each test; this schema is not.
    Analysis.objects.using(TENANT).all().delete()
    connections[TENANT].close()


@pytest.fixture
def job() -> int:
    """The id of the test's job in both aliases: a new one per test, as a notification
    of an earlier test's cancel may still be on its way to this process's watcher."""
    return next(_IDS)


def add(alias: str, job_id: int, **values: Any) -> int:
    return int(Analysis.objects.using(alias).create(id=job_id, **values).pk)


def row(alias: str, job_id: int) -> Analysis:
    return Analysis.objects.using(alias).get(pk=job_id)


def workers(alias: str) -> set[str]:
    return set(Worker.objects.using(alias).values_list("pk", flat=True))


@pytest.mark.postgresql
@both_aliases
def test_two_aliases_of_one_table_name_have_their_own_keys_and_channels(tenant):
    public, other = DjangoJobs(Analysis, using=PUBLIC), DjangoJobs(Analysis, using=tenant)
    table = Analysis._meta.db_table
    database = connections[PUBLIC].settings_dict["NAME"]
    schema = test_settings.TENANT_SCHEMA
    entry = connections[PUBLIC].settings_dict
    server = (entry["HOST"] or None, str(entry["PORT"]) or None, ())
    assert public._backend.key == ("django", "postgresql", server, database, "public", table)
    assert other._backend.key == ("django", "postgresql", server, database, schema, table)
    assert other._backend.worker_key == ("django", "postgresql", server, database, schema)
    assert public._backend.worker_key != other._backend.worker_key
    assert public._backend.channel == f"dbcancel:public.{table}"
    assert other._backend.channel == f"dbcancel:{schema}.{table}"


@pytest.mark.postgresql
@both_aliases
def test_a_cancel_through_one_alias_never_stops_the_same_id_through_the_other(tenant, job):
    """Watched, with a 30 s interval: only the registry or a notification could flip
    the other alias's job."""
    public = DjangoJobs(Analysis, using=PUBLIC, interval=30.0, heartbeat=NO_BEAT)
    other = DjangoJobs(Analysis, using=tenant, interval=30.0, heartbeat=NO_BEAT)
    add(PUBLIC, job)
    add(tenant, job)
    with public.run(job) as cp_public, other.run(job) as cp_other:
        wait_until(lambda: public.stats().listening and other.stats().listening, 30, "listeners")
        assert other.cancel(job, reason="tenant") is True
        assert cp_other.cancelled
        time.sleep(0.3)  # a notification on the wrong channel would be here by now
        assert not cp_public.cancelled
        cp_public()
    assert row(PUBLIC, job).status == Status.COMPLETED
    assert row(tenant, job).status == Status.CANCELLED
    assert row(tenant, job).cancel_reason == "tenant"


@pytest.mark.postgresql
@both_aliases
def test_each_alias_beats_its_own_worker_table_and_reaps_its_own_jobs(tenant, job):
    # A short period: each job's start beats (one earlier than a period ago does not),
    # whatever the tests before this one did with this process's heartbeats.
    public = DjangoJobs(Analysis, using=PUBLIC, heartbeat=BEAT, watch=False)
    other = DjangoJobs(Analysis, using=tenant, heartbeat=BEAT, watch=False)
    # The tenant's worker table: its rows are this test's (the schema is not flushed).
    Worker.objects.using(tenant).all().delete()
    add(tenant, job + 1, status="in_progress", worker_id="dead-host:1:x")
    add(PUBLIC, job)
    with public.run(job):
        assert worker_id() in workers(PUBLIC)
        assert workers(tenant) == set()  # public's beat went to public's table alone
        assert public.reap(60) == 0  # public's job is live; the tenant's dead one is not its
        assert row(tenant, job + 1).status == Status.IN_PROGRESS
        assert other.reap(60) == 1
        assert row(tenant, job + 1).status == Status.FAILED
        assert row(PUBLIC, job).status == Status.IN_PROGRESS
    add(tenant, job)
    with other.run(job):
        assert worker_id() in workers(tenant)
        assert public.reap(3600) == 0
        assert other.reap(3600) == 0
    assert row(PUBLIC, job).status == Status.COMPLETED
    assert row(tenant, job).status == Status.COMPLETED


@pytest.mark.postgresql
@both_aliases
def test_a_search_path_switched_per_request_cannot_reach_another_tenants_job(tenant, job):
    """What django-tenants does on one alias: per request, ``connection.schema_name``
    and ``SET search_path``. A DjangoJobs there would key the jobs of every tenant
    alike, and a cancel of public's job would stop the tenant's: it is refused."""
    connection = connections[PUBLIC]

    def request_for(schema: str) -> None:
        connection.schema_name = schema
        with connection.cursor() as cursor:
            cursor.execute(f"SET search_path TO {schema}")

    def two_requests() -> None:
        request_for(test_settings.TENANT_SCHEMA)
        jobs = DjangoJobs(Analysis, using=PUBLIC, watch=False, heartbeat=NO_BEAT)
        with jobs.run(job) as cp:  # the tenant's job
            request_for("public")
            assert jobs.cancel(job) is True  # public's job
            assert not cp.cancelled

    add(PUBLIC, job)
    add(tenant, job)
    try:
        with pytest.raises(DbcancelError, match="switches schemas per request"):
            two_requests()
    finally:
        del connection.schema_name
        connection.close()
    assert row(tenant, job).status == Status.PENDING
    assert row(PUBLIC, job).status == Status.PENDING


@pytest.fixture
def switching(alias: str) -> Iterator[Any]:
    """This thread's connection of ``alias``, made to look like django-tenants': it
    has a ``schema_name``, which the wrapper changes (and a ``SET search_path``
    follows) per request."""
    connection = connections[alias]
    yield connection
    if "schema_name" in vars(connection):
        del connection.schema_name


def test_a_connection_that_switches_schemas_per_request_is_refused(alias, switching):
    switching.schema_name = "tenant_b"
    with pytest.raises(DbcancelError, match=rf"DjangoJobs\(Analysis\) on database '{alias}'"):
        DjangoJobs(Analysis, using=alias)


def test_a_switch_after_the_jobs_was_built_is_refused_before_anything_is_sent(
    alias, switching, add, row
):
    jobs = DjangoJobs(Analysis, using=alias, watch=False)
    job = add()
    switching.schema_name = "tenant_b"
    with pytest.raises(DbcancelError, match=r"'tenant_b'.*one DjangoJobs per alias"):
        jobs.cancel(job)
    with pytest.raises(DbcancelError, match="switches schemas per request"), jobs.run(job):
        pass
    del switching.schema_name
    assert row(job).status == Status.PENDING  # nothing was changed
    assert jobs.cancel(job) is True
