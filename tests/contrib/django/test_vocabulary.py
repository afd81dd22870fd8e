"""One vocabulary: every entry point takes the same options, shows them back the same way,
calls bodies the same way and raises dbcancel's errors.

Jobs, DjangoJobs, the Flask extension and the four task-queue integrations, walked
through the same table of options and errors. In this folder because two of them need
Django configured; the SQLAlchemy ones run on a SQLite file of their own.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import sessionmaker

from dbcancel import DbcancelError, InvalidTransition, JobNotRunnable, Jobs, Status, UsageError
from dbcancel.contrib.django import DjangoJobs
from tests.models import Analysis, Base

from .testapp.models import Analysis as DjangoAnalysis

celery = pytest.importorskip("celery")
pytest.importorskip("flask")
pytest.importorskip("rq")
pytest.importorskip("dramatiq")

from dramatiq.brokers.stub import StubBroker  # noqa: E402
from flask import Flask  # noqa: E402

from dbcancel.contrib.celery import CeleryJobs  # noqa: E402
from dbcancel.contrib.django.tasks import DjangoTaskJobs  # noqa: E402
from dbcancel.contrib.dramatiq import DramatiqJobs  # noqa: E402
from dbcancel.contrib.flask import DBCancel  # noqa: E402
from dbcancel.contrib.rq import RQJobs  # noqa: E402

ENTRY_POINTS = [
    "Jobs",
    "DjangoJobs",
    "DBCancel",
    "CeleryJobs",
    "DjangoTaskJobs",
    "RQJobs",
    "DramatiqJobs",
]


def fake_clock() -> float:
    return 0.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("vocabulary") / "jobs.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def build(name: str, engine: Engine, **options: Any) -> Any:
    """The entry point `name`, on the SQLite file (SQLAlchemy) or Django's default alias."""
    if name == "Jobs":
        return Jobs(engine, Analysis, **options)
    if name == "DjangoJobs":
        return DjangoJobs(DjangoAnalysis, **options)
    if name == "DBCancel":
        return DBCancel(Flask(__name__), engine=engine, model=Analysis, **options)
    if name == "CeleryJobs":
        app = celery.Celery("vocabulary", broker="memory://", backend="cache+memory://")
        app.conf.update(task_always_eager=True, task_store_eager_result=True)
        return CeleryJobs(app, engine, Analysis, **options)
    if name == "DjangoTaskJobs":
        return DjangoTaskJobs(DjangoAnalysis, **options)
    if name == "RQJobs":
        return RQJobs(engine, Analysis, **options)
    assert name == "DramatiqJobs"
    return DramatiqJobs(engine, Analysis, broker=StubBroker(), **options)


def shown(entry: Any) -> tuple[Any, ...]:
    return (entry.interval, entry.watch, entry.heartbeat, entry.max_staleness, entry.clock)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_the_same_options_with_the_same_defaults(name: str, engine: Engine) -> None:
    assert shown(build(name, engine)) == (0.5, True, 10.0, None, None)
    given = build(name, engine, interval=0.25, clock=fake_clock, max_staleness=3, heartbeat=2)
    # watch is the mode in effect: a custom clock makes the default threadless.
    assert shown(given) == (0.25, False, 2.0, 3.0, fake_clock)
    assert build(name, engine, watch=False).watch is False
    assert build(name, engine, watch=None).watch is True
    assert build(name, engine).push is None
    assert build(name, engine, push="redis://127.0.0.1:6379/3").push == "redis://127.0.0.1:6379/3"
    assert build(name, engine).listen_url is None


LISTEN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize("name", ["Jobs", "DBCancel", "CeleryJobs", "RQJobs", "DramatiqJobs"])
def test_listen_url_is_taken_and_shown_back_everywhere(name: str) -> None:
    """On a PostgreSQL engine (nothing is opened while building), the option reaches the
    `Jobs` the entry point builds."""
    pg = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    try:
        if name == "DBCancel":
            app = Flask(__name__)
            entry = DBCancel(app, engine=pg, model=Analysis, listen_url=LISTEN_URL)
            with app.app_context():
                assert entry.jobs.listen_url == LISTEN_URL  # the app's Jobs, built lazily
        else:
            entry = build(name, pg, listen_url=LISTEN_URL)
        assert entry.listen_url == LISTEN_URL
    finally:
        pg.dispose()


@pytest.mark.parametrize("name", ["Jobs", "CeleryJobs", "RQJobs", "DramatiqJobs"])
def test_listen_url_on_sqlite_is_refused_where_the_entry_point_is_built(
    name: str, engine: Engine
) -> None:
    with pytest.raises(ValueError, match="listen_url is for PostgreSQL"):
        build(name, engine, listen_url=LISTEN_URL)


COMMON_BAD_OPTIONS = [
    ({"interval": 0}, ValueError, "interval must be a finite number of seconds > 0, got 0"),
    ({"interval": "1"}, TypeError, "interval must be a number of seconds, got '1'"),
    ({"clock": 5}, TypeError, "clock must be a callable returning seconds, got 5"),
    ({"watch": "yes"}, TypeError, "watch must be None, True or False, got 'yes'"),
    ({"watch": True, "clock": fake_clock}, ValueError, "watch=True polls from a background"),
    ({"max_staleness": -1}, ValueError, "max_staleness must be a finite number of seconds"),
    ({"heartbeat": 0}, ValueError, "heartbeat must be a finite number of seconds > 0, got 0"),
    ({"listen_url": 5432}, TypeError, "listen_url must be a str or a sqlalchemy URL, got int"),
    ({"listen_url": "mysql://h/db"}, ValueError, "listen_url must be a PostgreSQL URL"),
]
COMMON_IDS = [
    "interval-0",
    "interval-str",
    "clock-int",
    "watch-str",
    "watch-and-clock",
    "max_staleness-negative",
    "heartbeat-0",
    "listen_url-int",
    "listen_url-mysql",
]
BAD_OPTIONS = [
    *COMMON_BAD_OPTIONS,
    ({"push": 6379}, TypeError, "push must be None or a Redis URL"),
    ({"push": "127.0.0.1:6379"}, ValueError, "push='127.0.0.1:6379' is not a Redis URL"),
]


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("options", "error", "text"),
    BAD_OPTIONS,
    # Stable across xdist workers (a function's repr is not).
    ids=[*COMMON_IDS, "push-int", "push-no-scheme"],
)
def test_the_same_errors_for_the_same_bad_options(
    name: str, engine: Engine, options: dict[str, Any], error: type, text: str
) -> None:
    with pytest.raises(error) as info:
        build(name, engine, **options)
    assert type(info.value) is error
    assert str(info.value).startswith(text), str(info.value)


def test_a_sessionmaker_is_accepted_wherever_an_engine_is(engine: Engine) -> None:
    bind = sessionmaker(engine)
    app = celery.Celery("vocabulary", broker="memory://")
    for entry in (
        Jobs(bind, Analysis),
        DBCancel(Flask(__name__), engine=bind, model=Analysis),
        CeleryJobs(app, bind, Analysis),
        RQJobs(bind, Analysis),
        DramatiqJobs(bind, Analysis, broker=StubBroker()),
    ):
        assert entry.watch is True


# -- bodies: (cp, job_id, then the caller's arguments) -----------------------------------


def add_sqlalchemy(engine: Engine, **values: Any) -> int:
    with sessionmaker(engine).begin() as s:
        job = Analysis(**values)
        s.add(job)
        s.flush()
        return int(job.id)


def runner(name: str, engine: Engine, body: Callable[..., Any]) -> Callable[..., Any]:
    """A function that runs `body` for a job through the entry point `name`, as its
    queue or thread would, and returns what the run returned."""
    if name == "DBCancel":
        ext = build(name, engine, interval=0.05)

        def submit(job_id: int, *args: Any, **kwargs: Any) -> None:
            ext.submit(job_id, body, *args, **kwargs).join(30)

        return submit
    if name == "CeleryJobs":
        task = build(name, engine, interval=0.05).task(name=f"vocabulary.{next(NUMBERS)}")(body)

        def apply(job_id: int, *args: Any, **kwargs: Any) -> Any:
            eager = task.apply(args=(job_id, *args), kwargs=kwargs)
            # What the result backend recorded (Ignore ends an eager call quietly).
            recorded = task.AsyncResult(eager.id)
            if recorded.state == "FAILURE":
                raise recorded.result
            return eager.get()

        return apply
    if name == "DjangoTaskJobs":
        task = build(name, engine, interval=0.05).task()(body)
        return lambda job_id, *a, **kw: task.call(job_id, *a, **kw)
    if name == "RQJobs":
        return build(name, engine, interval=0.05).task()(body)  # type: ignore[no-any-return]
    assert name == "DramatiqJobs"
    actor = build(name, engine, interval=0.05).task(actor_name=f"vocabulary_{next(NUMBERS)}")(body)
    return actor.fn  # type: ignore[no-any-return]


NUMBERS = itertools.count()
RUNNERS = ["DBCancel", "CeleryJobs", "DjangoTaskJobs", "RQJobs", "DramatiqJobs"]


SEEN: list[Any] = []


def recording_body(cp: Any, job_id: int, label: str, *, size: int) -> str:
    """A body at module level (Django Tasks imports it by name) that records its call."""
    cp()
    SEEN.append((type(cp).__name__, job_id, label, size, threading.current_thread().name))
    return label


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", RUNNERS)
def test_bodies_get_the_checkpoint_the_job_id_then_the_callers_arguments(
    name: str, engine: Engine, tmp_path: Path
) -> None:
    SEEN.clear()
    seen = SEEN
    run = runner(name, engine, recording_body)
    django = name.startswith("Django")
    job_id = int(DjangoAnalysis.objects.create().pk) if django else add_sqlalchemy(engine)
    run(job_id, "a", size=3)
    assert [s[:4] for s in seen] == [("Checkpoint", job_id, "a", 3)]

    # A job that has already run: a DbcancelError, nothing runs.
    done = (
        int(DjangoAnalysis.objects.create(status=Status.COMPLETED.value).pk)
        if django
        else add_sqlalchemy(engine, status=Status.COMPLETED)
    )
    with pytest.raises(DbcancelError) as info:
        run(done, "b", size=1)
    wanted = InvalidTransition if name == "DBCancel" else JobNotRunnable
    assert isinstance(info.value, wanted)
    assert len(seen) == 1


@pytest.mark.django_db(transaction=True)
def test_usage_errors_are_dbcancel_errors(engine: Engine) -> None:
    job_id = int(DjangoAnalysis.objects.create().pk)
    jobs = DjangoJobs(DjangoAnalysis)
    with transaction.atomic(), pytest.raises(UsageError, match="nothing was changed"):
        jobs.cancel(job_id)
    ext = DBCancel(engine=engine, model=Analysis)
    with pytest.raises(UsageError, match="needs an application context"):
        ext.jobs  # noqa: B018
    assert issubclass(UsageError, DbcancelError)
    assert issubclass(UsageError, RuntimeError)  # what these errors were before


# -- the asyncio client: the same options; only the watched mode on real time ------------


def build_async(engine: Engine, **options: Any) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    from dbcancel import AsyncJobs

    return AsyncJobs(
        create_async_engine(f"sqlite+aiosqlite:///{engine.url.database}"), Analysis, **options
    )


def test_asyncjobs_takes_the_same_options_and_shows_them_the_same_way(engine: Engine) -> None:
    assert shown(build_async(engine)) == (0.5, True, 10.0, None, None)
    given = build_async(engine, interval=0.25, max_staleness=3, heartbeat=2, watch=True)
    assert shown(given) == (0.25, True, 2.0, 3.0, None)
    assert build_async(engine).listen_url is None


@pytest.mark.parametrize(
    ("options", "error", "text"),
    COMMON_BAD_OPTIONS,  # AsyncJobs does not take push
    ids=COMMON_IDS,
)
def test_asyncjobs_raises_the_same_errors_for_bad_options(
    engine: Engine, options: dict[str, Any], error: type, text: str
) -> None:
    with pytest.raises(error) as info:
        build_async(engine, **options)
    assert type(info.value) is error
    assert str(info.value).startswith(text), str(info.value)


@pytest.mark.parametrize(
    "options", [{"watch": False}, {"clock": fake_clock}], ids=["watch", "clock"]
)
def test_asyncjobs_refuses_a_mode_that_would_poll_on_the_loop(
    engine: Engine, options: dict[str, Any]
) -> None:
    with pytest.raises(UsageError, match="watched mode, on real time"):
        build_async(engine, **options)
