"""The in-process registry of running jobs: exact, bounded and thread-safe.

The unit tests drive ``dbcancel.registry.registry`` (the one the library uses) under a key
of their own, so that they cannot collide with jobs of the database tests. The last test
runs 500 real jobs through ``jobs.run`` on SQLite.
"""

from __future__ import annotations

import datetime as dt
import gc
import sys
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

import dbcancel.registry
from dbcancel import ActiveJob, Checkpoint, Jobs, Status
from dbcancel.registry import registry
from tests.models import Analysis

CYCLES = 100_000


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """An engine that never connects: checkpoints here are never polled."""
    engine = create_engine("sqlite://")
    yield engine
    engine.dispose()


@pytest.fixture
def key() -> Iterator[tuple[str, str]]:
    """A registry key nothing else uses; it must be empty again after the test."""
    key = ("test_registry", uuid.uuid4().hex)
    yield key
    assert registry.active(key) == ()


@pytest.fixture
def cp(engine: Engine, key: tuple[str, str]) -> Checkpoint:
    jobs = Jobs(engine, Analysis, interval=3600)
    return Checkpoint(jobs, 1, interval=3600, clock=time.monotonic, key=key)


def entry(job_id: Any, cp: Checkpoint) -> ActiveJob:
    return ActiveJob(job_id, cp, threading.current_thread(), dt.datetime.now(dt.UTC))


def registry_growth(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated in dbcancel/registry.py since ``snapshot`` and still alive."""
    only = [tracemalloc.Filter(True, dbcancel.registry.__file__)]
    now = tracemalloc.take_snapshot().filter_traces(only)
    return sum(s.size_diff for s in now.compare_to(snapshot.filter_traces(only), "filename"))


def test_entries_are_counted_and_found(cp, key):
    base = registry.size()
    first, second, other = entry(7, cp), entry(7, cp), entry(8, cp)
    for e in (first, second, other):
        registry.add(key, e)
    assert registry.size() == base + 3
    assert set(registry.active(key)) == {first, second, other}
    assert registry.checkpoints(key, 7) == (cp, cp)
    assert registry.checkpoints(key, 9) == ()
    assert registry.active(("no", "such key")) == ()
    registry.remove(key, first)
    assert set(registry.active(key)) == {second, other}
    registry.remove(key, first)  # twice: harmless
    registry.remove(("no", "such key"), second)  # another key: harmless
    assert registry.size() == base + 2
    registry.remove(key, second)
    registry.remove(key, other)
    assert registry.size() == base
    assert registry.checkpoints(key, 7) == ()


def test_hundred_thousand_cycles_leave_nothing_behind(cp, key):
    base = registry.size()
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(1000):  # warm up: let the containers reach their working size
            e = entry(i, cp)
            registry.add(key, e)
            registry.remove(key, e)
        before = tracemalloc.take_snapshot()
        peak = 0
        for i in range(CYCLES):
            e = entry(i, cp)
            registry.add(key, e)
            if i % 10_000 == 0:
                peak = max(peak, registry.size() - base)
            registry.remove(key, e)
        gc.collect()
        growth = registry_growth(before)
    finally:
        tracemalloc.stop()
    assert peak == 1
    assert registry.size() == base
    assert registry.active(key) == ()
    assert growth < 4096, f"the registry kept {growth} bytes after {CYCLES} jobs"


def test_batches_of_live_jobs_leave_nothing_behind(cp, key):
    """100 jobs running at once, 1000 times over: containers shrink back, not just empty."""
    base = registry.size()
    gc.collect()
    tracemalloc.start()
    try:
        batch = [entry(i, cp) for i in range(100)]
        for e in batch:
            registry.add(key, e)
        for e in batch:
            registry.remove(key, e)
        before = tracemalloc.take_snapshot()
        for n in range(CYCLES // 100):
            batch = [entry(n * 100 + i, cp) for i in range(100)]
            for e in batch:
                registry.add(key, e)
            assert registry.size() == base + 100
            for e in reversed(batch):
                registry.remove(key, e)
        del batch
        gc.collect()
        growth = registry_growth(before)
    finally:
        tracemalloc.stop()
    assert registry.size() == base
    assert growth < 4096, f"the registry kept {growth} bytes after {CYCLES} jobs"


def test_concurrent_add_and_remove(cp, key):
    """8 threads add and remove at once, half of the time under one shared job id."""
    base = registry.size()
    threads_n, cycles = 8, 4000
    barrier = threading.Barrier(threads_n + 1)
    stop_reading = threading.Event()
    errors: list[BaseException] = []

    def churn(n: int) -> None:
        try:
            barrier.wait(10)
            for i in range(cycles):
                job_id = 0 if i % 2 else (n, i)  # (n, i): this thread's own job
                e = entry(job_id, cp)
                registry.add(key, e)
                assert e in registry.active(key), "an added entry is missing"
                registry.remove(key, e)
                assert e not in registry.active(key), "a removed entry is still there"
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            barrier.wait(10)
            while not stop_reading.is_set():
                assert 0 <= registry.size() - base <= threads_n
                assert len(registry.active(key)) <= threads_n
                registry.checkpoints(key, 0)
        except BaseException as exc:
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        workers = [threading.Thread(target=churn, args=(n,), daemon=True) for n in range(threads_n)]
        reader = threading.Thread(target=read, daemon=True)
        for t in [*workers, reader]:
            t.start()
        for t in workers:
            t.join(60)
        stop_reading.set()
        reader.join(10)
    finally:
        sys.setswitchinterval(switch)
    assert not any(t.is_alive() for t in [*workers, reader])
    assert errors == []
    assert registry.size() == base
    assert registry.active(key) == ()
    assert registry.checkpoints(key, 0) == ()


@pytest.mark.sqlite
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_five_hundred_real_jobs_leave_the_registry_empty(db):
    jobs = db.jobs()
    assert registry.size() == 0, f"an earlier test left jobs in the registry: {jobs.active()}"
    with db.sessions.begin() as s:
        batch = [Analysis() for _ in range(500)]
        s.add_all(batch)
    ids = [job.id for job in batch]
    for n, job in enumerate(ids):
        with jobs.run(job) as cp:
            assert registry.size() == 1
            assert [e.job_id for e in jobs.active()] == [job]
            cp()
            if n % 5 == 0:
                jobs.cancel(job)
                cp()
    assert registry.size() == 0
    assert jobs.active() == ()
    with db.engine.connect() as conn:
        statuses = Counter(conn.execute(select(Analysis.status)).scalars())
    assert statuses == {Status.COMPLETED: 400, Status.CANCELLED: 100}
