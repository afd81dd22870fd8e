"""dbcancel.contrib.celery against real ``celery worker`` processes, RabbitMQ and Redis.

Per database a small cluster of nodes consumes one queue unique to the run (PostgreSQL:
two prefork nodes of concurrency 2 and a threads node; MariaDB: one prefork node;
SQLite: one solo node); each node also consumes ``<queue>.<name>`` so that a test can
aim at it. Tests that stop a node start their own.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery import states as celery_states
from sqlalchemy import delete, select

from dbcancel import Jobs, Status
from dbcancel.contrib.celery import REVOKED_REASON, SHUTDOWN_REASON
from tests.conftest import Database
from tests.models import Analysis

from .worker_app import client
from .workers import BACKEND, BROKER, ROOT, Node, close_app

ANALYSE = "dbcancel_test.analyse"
ANALYSE_LATE = "dbcancel_test.analyse_late"
FRAGILE = "dbcancel_test.fragile"
BOUND = "dbcancel_test.bound"
FLAKY = "dbcancel_test.flaky"
RETRY_LATER = "dbcancel_test.retry_later"
TIMEOUT = 60.0
POSTGRESQL = pytest.mark.parametrize("database", ["postgresql"], indirect=True)


def until(check: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Cluster:
    """The nodes of one database, the client app and helpers shared by the tests."""

    database: Database
    marks: Path
    token: str
    queue: str
    app: Celery
    jobs: Jobs
    nodes: dict[str, Node] = field(default_factory=dict)
    extra: list[Node] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)

    def node(self, name: str, pool: str, concurrency: int = 2, **kw: Any) -> Node:
        """A node consuming the cluster's queue and ``<queue>.<name>`` (not started)."""
        return Node(
            name,
            self.token,
            pool,
            concurrency,
            [self.queue, self.queue_of(name)],
            self.database.url,
            self.marks,
            **kw,
        )

    def own_node(self, name: str, pool: str, concurrency: int = 2, **kw: Any) -> Node:
        """A started node that consumes only ``<queue>.<name>``; stopped at teardown."""
        node = Node(
            name,
            self.token,
            pool,
            concurrency,
            [self.queue_of(name)],
            self.database.url,
            self.marks,
            **kw,
        )
        self.extra.append(node)
        self.queues.add(self.queue_of(name))
        return node.start().wait_ready()

    def queue_of(self, name: str) -> str:
        """The queue only node ``name`` consumes."""
        return f"{self.queue}.{name}"

    def send(self, task: str, *args: Any, queue: str | None = None, **options: Any) -> Any:
        """Send ``task`` with ``args`` (the job id first); returns its AsyncResult."""
        name = queue or self.queue
        self.queues.add(name)
        return self.app.send_task(task, args=list(args), queue=name, **options)

    def ran(self, job_id: int) -> list[str]:
        """One ``node pid`` line per run of the body of ``job_id``."""
        path = self.marks / f"ran-{job_id}"
        return path.read_text().splitlines() if path.exists() else []

    def state(self, result: Any, states: set[str], timeout: float = TIMEOUT) -> str:
        """Wait until the Celery state of ``result`` is one of ``states``; return it."""
        until(lambda: result.state in states, timeout, f"{result.id} in {states}")
        return str(result.state)

    def in_progress(self, *job_ids: int) -> None:
        """Wait until every job in ``job_ids`` is running."""
        until(
            lambda: all(self.jobs.status(j) is Status.IN_PROGRESS for j in job_ids),
            what=f"jobs {job_ids} in progress",
        )

    def ready(self, queue: str) -> int:
        """How many messages of ``queue`` the broker has not handed to a consumer yet."""
        with self.app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)

    def logs(self) -> str:
        """Every node's log so far."""
        return "\n".join(
            n.log.read_text(errors="replace")
            for n in [*self.nodes.values(), *self.extra]
            if n.log.exists()
        )


@pytest.fixture(scope="module")
def nodes(
    services: None, database: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    token = uuid.uuid4().hex[:8]
    marks = tmp_path_factory.mktemp(f"celery-{database.name}")
    app = client(BROKER, BACKEND)
    c = Cluster(
        database,
        marks,
        token,
        f"dbcancel-test-{os.getpid()}-{token}",
        app,
        Jobs(database.engine, Analysis, interval=0.05, heartbeat=0.2),
    )
    if database.name == "postgresql":
        layout = [("a", "prefork", 2), ("b", "prefork", 2), ("t", "threads", 2)]
    elif database.name == "mariadb":
        layout = [("a", "prefork", 2)]
    else:
        layout = [("s", "solo", 1)]
    for name, pool, concurrency in layout:
        c.nodes[name] = c.node(name, pool, concurrency)
        c.queues.update(c.nodes[name].queues)
    try:
        for node in c.nodes.values():
            node.start()
        for node in c.nodes.values():
            node.wait_ready()
        yield c
    finally:
        for node in [*c.nodes.values(), *c.extra]:
            node.cleanup()
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in c.queues:
                try:
                    channel.queue_delete(queue)
                except Exception:
                    channel = conn.channel()
        close_app(app)


@pytest.fixture
def cluster(nodes: Cluster, db: Database) -> Cluster:
    """The module's cluster, with the run marks of earlier tests removed (ids are reused
    once ``db`` empties the table)."""
    for path in nodes.marks.glob("ran-*"):
        path.unlink()
    return nodes


def test_cancel_before_pickup_never_runs_the_body(db: Database, cluster: Cluster) -> None:
    later = f"{cluster.queue}.later.{uuid.uuid4().hex[:6]}"
    cancelled, control, bound, revoked, deleted = (db.add() for _ in range(5))
    # Queued where no node consumes yet: the messages wait in RabbitMQ.
    r_cancelled = cluster.send(ANALYSE, cancelled, 5, 0.01, queue=later)
    r_control = cluster.send(ANALYSE, control, 5, 0.01, queue=later)
    r_bound = cluster.send(BOUND, bound, queue=later)
    r_revoked = cluster.send(ANALYSE, revoked, 5, 0.01, queue=later)
    r_deleted = cluster.send(ANALYSE, deleted, 5, 0.01, queue=later)
    assert cluster.jobs.cancel(cancelled, reason="user deleted it") is True
    assert cluster.jobs.cancel(deleted, reason="user deleted it") is True
    with db.engine.begin() as conn:
        conn.execute(delete(Analysis).where(Analysis.id == deleted))
    r_revoked.revoke()  # Celery's own revoke: the worker drops the message
    replies = cluster.app.control.add_consumer(
        later, destination=[n.hostname for n in cluster.nodes.values()], reply=True, timeout=10
    )
    assert len(replies) == len(cluster.nodes), replies

    assert cluster.state(r_control, celery_states.READY_STATES) == celery_states.SUCCESS
    assert r_control.result == 5
    assert cluster.state(r_bound, celery_states.READY_STATES) == celery_states.SUCCESS
    assert r_bound.result == r_bound.id  # the bound body got its task
    assert cluster.state(r_cancelled, celery_states.READY_STATES) == celery_states.REVOKED
    assert "user deleted it" in str(r_cancelled.result)
    assert cluster.state(r_deleted, celery_states.READY_STATES) == celery_states.REVOKED
    assert "deleted" in str(r_deleted.result)
    assert cluster.state(r_revoked, celery_states.READY_STATES) == celery_states.REVOKED
    until(lambda: cluster.jobs.status(revoked) is Status.CANCELLED, what="the revoked job")
    revoked_row = db.row(revoked)
    assert revoked_row is not None
    assert revoked_row.cancel_reason == REVOKED_REASON
    assert cluster.ran(cancelled) == []
    assert cluster.ran(revoked) == []
    assert cluster.ran(deleted) == []
    assert len(cluster.ran(control)) == 1
    row = db.row(cancelled)
    assert row is not None
    assert row.status is Status.CANCELLED
    assert row.started_at is None


def test_retries_run_the_body_again_and_never_resurrect_a_cancelled_job(
    db: Database, cluster: Cluster
) -> None:
    failing, cancelled, done, flaky, later, cancelled_later = (db.add() for _ in range(6))

    # A transient error (autoretry_for): the job goes back to pending and the retry runs
    # the body again, which succeeds; the row counts the attempts and keeps the error.
    r_flaky = cluster.send(FLAKY, flaky, 1)
    assert cluster.state(r_flaky, celery_states.READY_STATES) == celery_states.SUCCESS
    assert r_flaky.result == 2
    row = db.row(flaky)
    assert row is not None
    assert (row.status, row.attempts, row.error) == (Status.COMPLETED, 2, "OSError: transient")
    assert len(cluster.ran(flaky)) == 2

    # The body fails every time: three retries, then the last error fails the job.
    r_failing = cluster.send(FRAGILE, failing, True)
    assert cluster.state(r_failing, celery_states.READY_STATES) == celery_states.FAILURE
    assert isinstance(r_failing.result, OSError), repr(r_failing.result)
    row = db.row(failing)
    assert row is not None
    assert (row.status, row.attempts, row.error) == (Status.FAILED, 4, "OSError: disk full")
    assert len(cluster.ran(failing)) == 4

    # task.retry() in a bound body: pending until the retry runs it again.
    r_later = cluster.send(RETRY_LATER, later, 0.0)
    assert cluster.state(r_later, celery_states.READY_STATES) == celery_states.SUCCESS
    assert r_later.result == "attempt 2"
    assert len(cluster.ran(later)) == 2

    # Cancelled between two attempts: the retry never runs the body.
    r_cancelled_later = cluster.send(RETRY_LATER, cancelled_later, 1.5)
    until(lambda: cluster.ran(cancelled_later), what="the first attempt")
    until(
        lambda: cluster.jobs.status(cancelled_later) is Status.PENDING,
        what="the job pending again for its retry",
    )
    assert cluster.jobs.cancel(cancelled_later, reason="user deleted it") is True
    assert cluster.state(r_cancelled_later, celery_states.READY_STATES) == celery_states.REVOKED
    assert "user deleted it" in str(r_cancelled_later.result)
    assert len(cluster.ran(cancelled_later)) == 1
    assert cluster.jobs.wait(cancelled_later, timeout=5) is Status.CANCELLED

    # Cancelled while it runs; the cancel makes the body raise OSError (its "socket" is
    # closed by on_cancel). The cancel wins: REVOKED, and no retry runs it again.
    r_cancelled = cluster.send(FRAGILE, cancelled, False)
    cluster.in_progress(cancelled)
    assert cluster.jobs.cancel(cancelled, reason="user deleted it") is True
    assert cluster.jobs.wait(cancelled, timeout=TIMEOUT) is Status.CANCELLED
    assert cluster.state(r_cancelled, celery_states.READY_STATES) == celery_states.REVOKED

    r_done = cluster.send(ANALYSE, done, 1, 0.0)
    assert cluster.state(r_done, celery_states.READY_STATES) == celery_states.SUCCESS

    # Deliveries again, as retries (retries=1), of the cancelled and the completed job.
    again_cancelled = cluster.send(FRAGILE, cancelled, False, retries=1)
    assert cluster.state(again_cancelled, celery_states.READY_STATES) == celery_states.REVOKED
    again_done = cluster.send(ANALYSE, done, 1, 0.0, retries=1)
    assert cluster.state(again_done, celery_states.READY_STATES) == celery_states.FAILURE
    assert type(again_done.result).__name__ == "JobNotRunnable", repr(again_done.result)
    assert again_done.result.status == "completed"
    assert r_done.state == celery_states.SUCCESS

    assert len(cluster.ran(cancelled)) == 1
    assert len(cluster.ran(done)) == 1
    assert cluster.jobs.status(cancelled) is Status.CANCELLED
    assert cluster.jobs.status(done) is Status.COMPLETED


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
def test_random_cancels_over_the_nodes(db: Database, cluster: Cluster) -> None:
    # 200 over the three PostgreSQL nodes, 60 over MariaDB's one node (two processes).
    default = "200" if db.name == "postgresql" else "60"
    n = int(os.environ.get("DBCANCEL_CELERY_TASKS", default))
    slots = sum(node.concurrency for node in cluster.nodes.values())
    rng = random.Random(int(os.environ.get("DBCANCEL_CELERY_SEED", "1")))
    ids = [db.add() for _ in range(n)]
    results = {job_id: cluster.send(ANALYSE, job_id, rng.randint(3, 25), 0.02) for job_id in ids}
    # 60 % are cancelled: a third of those at random moments of the whole run (most are
    # then queued or done), two thirds at a random moment of their own run, after a worker
    # was seen running them.
    chosen = rng.sample(ids, n * 3 // 5)
    anytime, running = chosen[: len(chosen) // 3], set(chosen[len(chosen) // 3 :])
    horizon = n * 0.4 / slots
    start = time.monotonic()
    due = {job_id: start + rng.uniform(0, horizon) for job_id in anytime}
    cancelled: dict[int, bool] = {}
    deadline = start + 120
    while (due or running) and time.monotonic() < deadline:
        now = time.monotonic()
        with db.sessions() as s:
            statuses = dict(
                s.execute(
                    select(Analysis.id, Analysis.status).where(Analysis.id.in_(list(running)))
                ).all()
            )
        for job_id, status in statuses.items():
            if status is Status.IN_PROGRESS and job_id not in due:
                due[job_id] = now + rng.uniform(0, 0.3)
            elif status is not Status.PENDING and job_id not in due:
                running.discard(job_id)  # finished before it was seen running
        for job_id, at in list(due.items()):
            if at <= now:
                cancelled[job_id] = cluster.jobs.cancel(job_id, reason="random")
                del due[job_id]
                running.discard(job_id)
        time.sleep(0.02)  # the pace of the canceller's loop, not a synchronisation
    assert not due, "the canceller ran out of time"
    assert not running, "the canceller ran out of time"

    deadline = time.monotonic() + 120
    final = {j: cluster.jobs.wait(j, timeout=max(1.0, deadline - time.monotonic())) for j in ids}
    with db.sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Analysis).where(Analysis.id.in_(ids)))}

    won = [j for j, ok in cancelled.items() if ok]
    assert [j for j in won if final[j] is not Status.CANCELLED] == []
    assert [j for j in ids if rows[j].status is Status.IN_PROGRESS] == []
    assert [j for j in ids if rows[j].finished_at is None] == []
    assert {final[j] for j in ids} <= {Status.CANCELLED, Status.COMPLETED}
    # Every cancel of a running job was seen by its worker; a job cancelled while
    # queued never started, and its body never ran.
    assert [j for j in won if rows[j].started_at and rows[j].cancel_observed_at is None] == []
    assert [j for j in ids if rows[j].started_at is None and cluster.ran(j)] == []
    for job_id, result in results.items():
        want = celery_states.REVOKED if final[job_id] is Status.CANCELLED else "SUCCESS"
        assert cluster.state(result, celery_states.READY_STATES) == want, job_id
    nodes = {line.split()[0] for j in ids for line in cluster.ran(j)}
    assert nodes == set(cluster.nodes), nodes
    print(
        f"{n} tasks, {len(cancelled)} cancels ({len(won)} True), "
        f"{sum(1 for j in won if rows[j].started_at)} while running, "
        f"{sum(1 for s in final.values() if s is Status.COMPLETED)} completed"
    )


@POSTGRESQL
def test_sigkill_of_a_node_is_reaped_and_others_keep_working(
    db: Database, cluster: Cluster
) -> None:
    killed = cluster.own_node("k", "prefork", 2)
    lost = [db.add(), db.add()]
    survivor = db.add()
    cluster.send(ANALYSE, lost[0], 3000, 0.02, queue=cluster.queue_of("k"))
    r_late = cluster.send(ANALYSE_LATE, lost[1], 3000, 0.02, queue=cluster.queue_of("k"))
    r_survivor = cluster.send(ANALYSE, survivor, 150, 0.02, queue=cluster.queue_of("a"))
    cluster.in_progress(*lost, survivor)
    # A row is in_progress just before its body starts: the kill must come after both ran.
    until(lambda: all(cluster.ran(job_id) for job_id in lost), what="both bodies on node k")

    killed.kill()  # the main process and its pool children, as the OOM killer would
    reaped = 0

    def reap() -> bool:
        nonlocal reaped
        reaped += cluster.jobs.reap(stale_after=1.0)
        return reaped >= 2

    until(reap, what="the killed node's jobs reaped")
    for job_id in lost:
        assert cluster.jobs.wait(job_id, timeout=10) is Status.FAILED
        row = db.row(job_id)
        assert row is not None
        assert row.error == "worker lost"
    assert reaped == 2  # the survivor beats: never reaped
    # The acks_late message of the killed run goes to node a once it consumes k's queue:
    # the job is failed (reaped), so nothing runs and Celery records JobNotRunnable.
    cluster.app.control.add_consumer(
        cluster.queue_of("k"), destination=[cluster.nodes["a"].hostname], reply=True, timeout=10
    )
    assert cluster.state(r_late, celery_states.READY_STATES) == celery_states.FAILURE
    assert type(r_late.result).__name__ == "JobNotRunnable", repr(r_late.result)
    assert [line.split()[0] for line in cluster.ran(lost[1])] == ["k"]
    assert cluster.jobs.wait(survivor, timeout=TIMEOUT) is Status.COMPLETED
    assert cluster.state(r_survivor, celery_states.READY_STATES) == celery_states.SUCCESS
    after = db.add()
    r_after = cluster.send(ANALYSE, after, 2, 0.01)
    assert cluster.state(r_after, celery_states.READY_STATES) == celery_states.SUCCESS


@POSTGRESQL
@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 2), ("solo", 1)])
def test_warm_shutdown_cancels_the_running_jobs(
    db: Database, cluster: Cluster, pool: str, concurrency: int
) -> None:
    node = cluster.own_node(f"w{pool}", pool, concurrency)
    ids = [db.add() for _ in range(concurrency)]
    results = [
        cluster.send(ANALYSE, job_id, 3000, 0.02, queue=cluster.queue_of(node.name))
        for job_id in ids
    ]
    cluster.in_progress(*ids)
    started = time.monotonic()
    code = node.terminate(timeout=30)
    took = time.monotonic() - started
    assert code == 0, node.tail()
    assert took < 20, f"warm shutdown took {took:.1f}s"
    for job_id, result in zip(ids, results, strict=True):
        assert cluster.jobs.wait(job_id, timeout=5) is Status.CANCELLED
        row = db.row(job_id)
        assert row is not None
        assert row.cancel_reason == SHUTDOWN_REASON
        assert row.finished_at is not None
        assert row.cancel_observed_at is not None
        assert cluster.state(result, celery_states.READY_STATES) == celery_states.REVOKED
        assert SHUTDOWN_REASON in str(result.result)


@POSTGRESQL
@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 2), ("solo", 1)])
def test_warm_shutdown_sends_prefetched_messages_to_another_node(
    db: Database, cluster: Cluster, pool: str, concurrency: int
) -> None:
    node = cluster.own_node(f"p{pool}", pool, concurrency)
    running = [db.add() for _ in range(concurrency)]
    prefetched = [db.add() for _ in range(concurrency)]
    queue = cluster.queue_of(node.name)
    results = [cluster.send(ANALYSE, job_id, 3000, 0.02, queue=queue) for job_id in running]
    cluster.in_progress(*running)
    later = [cluster.send(ANALYSE, job_id, 2, 0.01, queue=queue) for job_id in prefetched]
    # The broker has handed them to the node (prefetch: concurrency x 1), which holds
    # them without running them.
    until(lambda: cluster.ready(queue) == 0, what="the messages prefetched by the node")
    assert node.terminate(timeout=30) == 0, node.tail()
    for job_id, result in zip(running, results, strict=True):
        assert cluster.jobs.wait(job_id, timeout=5) is Status.CANCELLED
        assert cluster.state(result, celery_states.READY_STATES) == celery_states.REVOKED
    # The prefetched jobs never started there: they wait in the queue for another node.
    assert [cluster.jobs.status(j) for j in prefetched] == [Status.PENDING] * concurrency
    cluster.app.control.add_consumer(
        queue, destination=[cluster.nodes["a"].hostname], reply=True, timeout=10
    )
    for job_id, result in zip(prefetched, later, strict=True):
        assert cluster.state(result, celery_states.READY_STATES) == celery_states.SUCCESS
        assert [line.split()[0] for line in cluster.ran(job_id)] == ["a"]
        assert cluster.jobs.status(job_id) is Status.COMPLETED
    cluster.app.control.cancel_consumer(
        queue, destination=[cluster.nodes["a"].hostname], reply=True, timeout=10
    )


@POSTGRESQL
def test_warm_shutdown_with_wait_finishes_the_running_job(db: Database, cluster: Cluster) -> None:
    node = cluster.own_node("wait", "solo", 1, on_shutdown="wait")
    job_id = db.add()
    result = cluster.send(ANALYSE, job_id, 100, 0.02, queue=cluster.queue_of(node.name))
    cluster.in_progress(job_id)
    assert node.terminate(timeout=30) == 0, node.tail()
    assert cluster.jobs.status(job_id) is Status.COMPLETED
    assert cluster.state(result, celery_states.READY_STATES) == celery_states.SUCCESS


def test_the_example_app(services: None, tmp_path: Path) -> None:
    queue = f"dbcancel-example-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'analysis.db'}",
        "BROKER_URL": BROKER,
        "RESULT_BACKEND": BACKEND,
        "QUEUE": queue,
    }
    folder = ROOT / "examples" / "celery_app"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "-c",
            "2",
            "-n",
            f"example-{queue}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out = subprocess.run(
            [sys.executable, "tasks.py"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        app = client(BROKER, BACKEND)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        close_app(app)
    first, *rest = out.splitlines()
    assert first.startswith("cancelling "), out
    assert rest == ["stopped: cancelled", "celery: REVOKED", "kept: completed 5"]


@POSTGRESQL
@pytest.mark.slow
def test_the_benchmark_runs(services: None, database: Database) -> None:
    """A smoke run of benchmarks/bench_celery.py; it asserts nothing about speed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_celery.py"), "--quick", "--trials", "2"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    assert "| (a) `is_aborted()` ÷ `cp()`" in done.stdout, done.stdout + done.stderr
    assert "| (c) NOTIFY p95 in Celery ÷ outside Celery" in done.stdout, done.stdout
