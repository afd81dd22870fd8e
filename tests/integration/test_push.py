"""Push through Redis pub/sub: a cancel from another process arrives by push, polling
takes over while Redis is down, and no message (forged, duplicated, dropped) changes a
result: the row decides.

Latencies are read from the row (`cancel_requested_at` -> `cancel_observed_at`, both on
this machine's clock). Bounds are generous; the benchmark measures the real figures.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from dbcancel import Cancelled, Jobs, Status
from dbcancel._push import redis_channel
from dbcancel._runtime import runtime
from tests.models import Analysis

from .redis_server import RedisServer, shared_url

# Redis servers of the tests' own and worker processes: what they test does not change
# with the Python version, so they run on the first Python of test-all only.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__

# A process of its own that cancels (and publishes) on request, one line per command:
# the test's own cancels would reach its checkpoints without any push.
CANCELLER = """
import json, sys
from sqlalchemy import create_engine
from dbcancel import Jobs
from dbcancel._push import _publisher
from tests.models import Analysis

url, push = sys.argv[1], sys.argv[2]
jobs = {url: Jobs(create_engine(url), Analysis, push=push, watch=False)}
print("ready", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command[0] == "cancel":
        where = command[3] if len(command) > 3 else url
        if where not in jobs:
            jobs[where] = Jobs(create_engine(where), Analysis, push=push, watch=False)
        answer = jobs[where].cancel(command[1], reason=command[2])
    elif command[0] == "stop":  # the end of a job that ran there, as run() writes it
        jobs[url]._backend.mark_stopped(command[1])
        answer = None
    else:
        _publisher(push).publish(command[1], command[2])
        answer = None
    print(json.dumps(answer), flush=True)
"""


class Canceller:
    """The other process: `cancel(job, reason)`, `publish(channel, payload)`."""

    def __init__(self, url: str, push: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CANCELLER, url, push],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the canceller process died"
        return line.strip()

    def _ask(self, *command: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def cancel(self, job: int, reason: str, url: str | None = None) -> bool:
        """Cancel `job` (in the database of `url`, by default the canceller's own)."""
        if url is None:
            return bool(self._ask("cancel", job, reason))
        return bool(self._ask("cancel", job, reason, url))

    def stop(self, job: int) -> None:
        """Write `job`'s end as its worker's run() does (and publish it)."""
        self._ask("stop", job)

    def publish(self, channel: str, payload: str) -> None:
        self._ask("publish", channel, payload)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Worker:
    """A thread running `job`: `cp()` in a loop until its cancel arrives."""

    def __init__(self, jobs: Jobs, job: int) -> None:
        self.jobs, self.job = jobs, job
        self.entered = threading.Event()
        self.cp: Any = None
        self.cancelled: Cancelled | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.entered.wait(10), "the worker did not enter run()"

    def _main(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:
                self.cp = cp
                self.entered.set()
                while True:
                    try:
                        cp()
                    except Cancelled as exc:
                        self.cancelled = exc
                        raise
                    time.sleep(0.001)
        finally:
            self.entered.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def latency(db: Any, job: int) -> float:
    """Seconds from the cancel's request to its observation, as the row says."""
    with db.engine.connect() as conn:
        row = conn.execute(
            select(TABLE.c.cancel_requested_at, TABLE.c.cancel_observed_at).where(TABLE.c.id == job)
        ).one()
    assert row[0] is not None, row
    assert row[1] is not None, row
    return float((row[1] - row[0]).total_seconds())


def status(db: Any, job: int) -> Status:
    with db.engine.connect() as conn:
        return Status(conn.execute(select(TABLE.c.status).where(TABLE.c.id == job)).scalar_one())


@pytest.fixture
def started(db: Any) -> Iterator[list[Any]]:
    """Workers and cancellers to stop at teardown, whatever the test did."""
    things: list[Any] = []
    yield things
    for thing in things:
        if isinstance(thing, Worker) and thing.thread.is_alive():
            with db.engine.begin() as conn:
                stop = update(TABLE).where(TABLE.c.id == thing.job).values(status="cancelled")
                conn.execute(stop)
            thing.join(15)
        elif isinstance(thing, Canceller):
            thing.close()
    # The runtime keeps a table's listener while it serves the table: forget it, so that
    # the next test's Jobs of the same table listens through its own push URL.
    assert runtime().close_idle(10) == []


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, killed at teardown."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def listening(jobs: Jobs) -> bool:
    return jobs.stats().listening


def test_a_cancel_from_another_process_arrives_by_push(db: Any, started: list[Any]) -> None:
    push = shared_url()
    jobs = db.jobs(interval=5.0, push=push)
    assert jobs.push == push
    canceller = Canceller(db.url, push)
    started.append(canceller)
    for attempt in range(3):
        job = db.add()
        worker = Worker(jobs, job)
        started.append(worker)
        until(lambda: listening(jobs), 10, "the table's channel is subscribed")
        assert canceller.cancel(job, f"stop {attempt}")
        assert worker.join(4.0), "the pushed cancel did not arrive well under the interval"
        assert worker.cancelled is not None
        assert worker.cancelled.reason == f"stop {attempt}"
        assert latency(db, job) < 2.0  # the interval is 5 s: this came by push
    assert jobs.stats().notifications >= 3


def test_polling_takes_over_while_redis_is_down_and_push_resumes(
    db: Any, started: list[Any], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    interval = 2.0
    jobs = db.jobs(interval=interval, push=redis_server.url)
    canceller = Canceller(db.url, redis_server.url)
    started.append(canceller)

    job = db.add()
    worker = Worker(jobs, job)
    started.append(worker)
    until(lambda: listening(jobs), 10, "subscribed")

    redis_server.kill()
    until(lambda: not listening(jobs), 10, "the runtime saw Redis go")
    with caplog.at_level(logging.WARNING, logger="dbcancel"):
        assert canceller.cancel(job, "while down")  # the publish fails, the cancel stands
    assert worker.join(interval * 1.1 + 5.0)
    assert worker.cancelled is not None
    assert worker.cancelled.reason == "while down"
    assert latency(db, job) <= interval * 1.1 + 1.0
    assert status(db, job) is Status.CANCELLED

    redis_server.start()  # same port
    job = db.add()
    worker = Worker(jobs, job)
    started.append(worker)
    until(lambda: listening(jobs), 15, "the runtime subscribed again")
    # The canceller's publisher backs off after its failures (at most 5 s) and tries
    # again: cancel until one arrives by push (well under the interval).
    assert canceller.cancel(job, "back")
    assert worker.join(interval * 1.1 + 5.0)
    pushed = [latency(db, job)]
    for _ in range(5):
        if pushed[-1] < interval / 4:
            break
        job = db.add()
        worker = Worker(jobs, job)
        started.append(worker)
        time.sleep(1.0)  # lets the publisher's backoff run out
        assert canceller.cancel(job, "back")
        assert worker.join(interval * 1.1 + 5.0)
        pushed.append(latency(db, job))
    print(f"latencies after the restart: {pushed}")
    assert pushed[-1] < interval / 4, f"push did not resume: {pushed}"


def test_forged_duplicated_and_dropped_pushes_never_change_a_result(
    db: Any, started: list[Any]
) -> None:
    push = shared_url()
    interval = 1.0
    jobs = db.jobs(interval=interval, push=push)
    canceller = Canceller(db.url, push)
    started.append(canceller)
    job, other = db.add(), db.add()
    worker = Worker(jobs, job)
    started.append(worker)
    until(lambda: listening(jobs), 10, "subscribed")
    channel = redis_channel(push, jobs._backend.key)
    key = list(jobs._backend.key)
    tenant = redis_channel(push, (*key[:-2], "another_schema", key[-1]))
    assert tenant != channel

    forged = [
        (channel, json.dumps([str(job), "forged"])),  # a cancel the row never had
        (channel, "*"),
        (channel, str(job)),
        (channel, "garbage \x00 {["),
        (channel, json.dumps([str(other), "not running"])),
        (channel, json.dumps([str(job), None, "stopped"])),  # an end that did not happen
        (tenant, json.dumps([str(job), "another tenant's job 7"])),
    ]
    before = jobs.stats().notifications
    for target, payload in forged * 3:  # duplicated too
        canceller.publish(target, payload)
    until(
        lambda: jobs.stats().notifications >= before + 3 * (len(forged) - 1),
        10,
        "the forged messages arrived",
    )
    time.sleep(interval * 1.5)  # and a regular poll went by
    assert worker.thread.is_alive()
    assert worker.cancelled is None
    assert not worker.cp.cancelled
    assert status(db, job) is Status.IN_PROGRESS
    assert status(db, other) is Status.PENDING

    # A real cancel, its message duplicated with another reason: the row's reason wins.
    assert canceller.cancel(job, "the real one")
    canceller.publish(channel, json.dumps([str(job), "a duplicate that lies"]))
    assert worker.join(5.0)
    assert worker.cancelled is not None
    assert worker.cancelled.reason == "the real one"
    assert status(db, job) is Status.CANCELLED

    # A dropped push (the row changed without a message): the next poll sees it.
    job = db.add()
    worker = Worker(jobs, job)
    started.append(worker)
    with db.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id == job)
            .values(status="cancelled", cancel_reason="unannounced")
        )
    assert worker.join(interval * 1.1 + 5.0)
    assert worker.cancelled is not None
    assert worker.cancelled.reason == "unannounced"


def test_one_redis_connection_serves_every_table_of_the_process(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    import redis
    from sqlalchemy import create_engine

    from tests.models import Base

    tables = []
    for name in ("a", "b", "c"):  # three databases (SQLite files), one push URL
        engine = create_engine(f"sqlite:///{tmp_path / name}.db")
        Base.metadata.create_all(engine)
        tables.append((engine, Jobs(engine, Analysis, interval=5.0, push=redis_server.url)))
    workers = []
    for engine, jobs in tables:
        with engine.begin() as conn:
            job = conn.execute(insert(TABLE).values(status="pending")).inserted_primary_key[0]
        workers.append(Worker(jobs, job))
    canceller = Canceller(str(tables[0][0].url), redis_server.url)
    try:
        until(lambda: all(listening(jobs) for _, jobs in tables), 10, "every table subscribed")
        assert runtime().stats().listeners == 0  # no listener connection to any database
        client = redis.Redis.from_url(redis_server.url)
        try:
            subscribers = client.client_list(_type="pubsub")
            assert len(subscribers) == 1, subscribers
            # Per table: its channel ("*", reaps) and the channel of its running job.
            assert int(subscribers[0]["sub"]) == 6
        finally:
            client.close()
        # Each table's cancel, from another process, reaches its own worker by push.
        for (engine, _), worker in zip(tables, workers, strict=True):
            assert canceller.cancel(worker.job, "pushed", str(engine.url))
            assert worker.join(3.0), "the pushed cancel did not arrive well under the interval"
            assert worker.cancelled is not None
        for _, jobs in tables:
            assert jobs.stats().notifications >= 1
    finally:
        canceller.close()
        for (engine, _), worker in zip(tables, workers, strict=True):
            if worker.thread.is_alive():
                with engine.begin() as conn:
                    conn.execute(update(TABLE).values(status="cancelled"))
                worker.join(15)
        assert runtime().close_idle(10) == []
        for engine, _ in tables:
            engine.dispose()


def test_random_interleavings_of_messages_and_cancels_leave_the_rows_in_charge(
    db: Any, started: list[Any]
) -> None:
    """Forged cancels, garbage, ends that did not happen, "poll everything" and real
    cancels that were never announced, in a random order: every job ends as its row
    says, with the row's reason, and no other job stops."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown with a failure, to replay it
    rng = random.Random(seed)
    push = shared_url()
    interval = 0.5
    jobs = db.jobs(interval=interval, push=push)
    canceller = Canceller(db.url, push)
    started.append(canceller)
    ids = [db.add() for _ in range(4)]
    workers = {job: Worker(jobs, job) for job in ids}
    started.extend(workers.values())
    until(lambda: listening(jobs), 10, "subscribed")
    channel = redis_channel(push, jobs._backend.key)
    cancelled: dict[int, str] = {}
    for step in range(30):
        job = rng.choice(ids)
        action = rng.choice(["forge", "forge", "end", "garbage", "all", "cancel", "silent"])
        if action == "forge":
            canceller.publish(channel, json.dumps([str(job), f"forged {step}"]))
        elif action == "end":
            canceller.publish(channel, json.dumps([str(job), None, "stopped"]))
        elif action == "garbage":
            canceller.publish(channel, rng.choice(["", "[", "null", "[1, 2]", "\u00e9" * 300]))
        elif action == "all":
            canceller.publish(channel, "*")
        elif job not in cancelled and rng.random() < 0.5:
            reason = f"{action} {step}"
            if action == "cancel":
                assert canceller.cancel(job, reason)
            else:  # a cancel whose publish was dropped
                with db.engine.begin() as conn:
                    conn.execute(
                        update(TABLE)
                        .where(TABLE.c.id == job)
                        .values(status="cancelled", cancel_reason=reason)
                    )
            cancelled[job] = reason
    for job, reason in cancelled.items():
        worker = workers[job]
        assert worker.join(interval * 1.1 + 5.0), f"job {job} did not see its cancel"
        assert worker.cancelled is not None
        assert worker.cancelled.reason == reason
    time.sleep(interval * 1.5)  # a regular poll went by for the others
    for job, worker in workers.items():
        if job not in cancelled:
            assert worker.thread.is_alive(), f"job {job} stopped without a cancel"
            assert status(db, job) is Status.IN_PROGRESS


def test_a_wait_in_another_process_is_woken_by_the_pushed_end(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from sqlalchemy import create_engine

    from tests.models import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        job = conn.execute(insert(TABLE).values(status="in_progress")).inserted_primary_key[0]
    jobs = Jobs(engine, Analysis, interval=5.0, push=redis_server.url)
    canceller = Canceller(str(engine.url), redis_server.url)
    ended: list[float] = []
    waiter = threading.Thread(
        target=lambda: (jobs.wait(job, timeout=30), ended.append(time.monotonic())), daemon=True
    )
    try:
        waiter.start()
        until(lambda: listening(jobs), 10, "the waiter's table subscribed")
        time.sleep(3.0)  # the wait's own polls have backed off to once a second
        before = jobs.stats().notifications
        with engine.begin() as conn:
            conn.execute(update(TABLE).where(TABLE.c.id == job).values(status="completed"))
        stopped = time.monotonic()
        canceller.stop(job)
        waiter.join(10)
        assert ended, "wait() did not return"
        assert jobs.stats().notifications > before  # the end arrived by push
        assert ended[0] - stopped < 0.9  # before the next of the wait's polls, at most 1 s
    finally:
        canceller.close()
        waiter.join(10)
        assert runtime().close_idle(10) == []
        engine.dispose()
