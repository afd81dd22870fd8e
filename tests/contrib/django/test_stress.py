"""DjangoJobs under races: many workers against random cancels, and head-on races.

Whatever the interleaving, a job whose ``cancel()`` returned True must end cancelled
(never completed after a cancel), every job must end stopped, and no thread may outlive
the run. The randomness is seeded and printed; replay with ``DBCANCEL_STRESS_SEED``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
from django.db import transaction

from dbcancel import Cancelled, Status
from dbcancel.contrib.django import backend as django_backend

from .testapp.models import Analysis, Result

pytestmark = pytest.mark.slow

JOIN_TIMEOUT = 60
FAILURE = "planned failure"


@dataclass(frozen=True)
class Plan:
    job_id: int
    items: int
    fail: bool
    atomic: bool  # complete with cp.complete(alias) in a transaction writing a result
    race_end: bool  # one cancel is fired the moment the worker's loop ends


@dataclass
class Outcome:
    cancels: dict[int, list[bool]] = field(default_factory=lambda: defaultdict(list))
    body_done: set[int] = field(default_factory=set)
    errors: list[tuple[object, BaseException]] = field(default_factory=list)


def seeded(request: pytest.FixtureRequest) -> random.Random:
    env = os.environ.get("DBCANCEL_STRESS_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    print(f"{request.node.nodeid}: seed {seed} (replay with DBCANCEL_STRESS_SEED={seed})")
    return random.Random(seed)


def test_no_completed_after_cancel(alias, jobs, add, threads, request):
    rng = seeded(request)
    count = 24 if alias != "default" else 12
    plans = [
        Plan(
            job_id=add(session_id="stress"),
            items=rng.randint(0, 20) if rng.random() < 0.5 else rng.randint(300, 1500),
            fail=rng.random() < 0.15,
            atomic=rng.random() < 0.5,
            race_end=rng.random() < 0.5,
        )
        for _ in range(count)
    ]
    # One job runs until it is cancelled, so that every run has a cancel to check.
    plans[0] = Plan(plans[0].job_id, items=10**7, fail=False, atomic=False, race_end=False)
    targets = [(rng.uniform(0, 0.5), p.job_id) for p in plans if rng.random() < 0.6]
    targets.append((rng.uniform(0, 0.5), plans[0].job_id))
    out = Outcome()
    go = threading.Event()
    loop_done = {p.job_id: threading.Event() for p in plans}

    def worker(plan: Plan) -> None:
        assert go.wait(JOIN_TIMEOUT)
        entered = False
        try:
            with jobs.run(plan.job_id) as cp:
                entered = True
                for _ in range(plan.items):
                    cp()
                    time.sleep(0.0002)  # stands in for one item's work
                loop_done[plan.job_id].set()
                if plan.fail:
                    raise RuntimeError(FAILURE)
                if plan.atomic:
                    with transaction.atomic(using=alias):
                        Result.objects.using(alias).create(analysis_id=plan.job_id, value="r")
                        cp.complete(alias)
                out.body_done.add(plan.job_id)
        except RuntimeError as exc:
            if str(exc) != FAILURE:
                raise
        except Cancelled:
            # Cancelled before this worker got to it: the with statement raises, and the
            # body never runs. A cancel inside the body never escapes the block.
            if entered:
                raise
        finally:
            loop_done[plan.job_id].set()

    def end_racer(job_id: int) -> None:
        assert loop_done[job_id].wait(JOIN_TIMEOUT)
        out.cancels[job_id].append(jobs.cancel(job_id, reason="end racer"))

    def canceller(schedule: list[tuple[float, int]]) -> None:
        assert go.wait(JOIN_TIMEOUT)
        start = time.monotonic()
        for at, job_id in sorted(schedule):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # a random moment; pacing, not synchronisation
            out.cancels[job_id].append(jobs.cancel(job_id, reason="canceller"))

    for plan in plans:
        threads.start(lambda plan=plan: worker(plan), name=f"worker-{plan.job_id}")
        if plan.race_end:
            threads.start(lambda j=plan.job_id: end_racer(j), name=f"racer-{plan.job_id}")
    for n in range(3):
        threads.start(lambda n=n: canceller(targets[n::3]), name=f"canceller-{n}")
    go.set()
    threads.join()

    results = Counter(
        Result.objects.using(alias)
        .filter(analysis_id__in=[p.job_id for p in plans])
        .values_list("analysis_id", flat=True)
    )
    seen: Counter[Status] = Counter()
    for plan in plans:
        job = plan.job_id
        final = jobs.wait(job, timeout=30)
        row = Analysis.objects.using(alias).get(pk=job)
        seen[final] += 1
        where = f"job {job} {plan}: cancels {out.cancels.get(job)}, ended {final}"
        assert row.finished_at is not None, where
        if any(out.cancels.get(job, [])):
            assert final is Status.CANCELLED, where
            assert results[job] == 0, f"{where}: results of a cancelled job"
        if final is Status.COMPLETED:
            assert job in out.body_done, where
            assert results[job] == (1 if plan.atomic else 0), where
        elif final is Status.FAILED:
            assert plan.fail, where
        if plan.atomic and job in out.body_done:
            assert final is Status.COMPLETED, where  # cp.complete() committed: final
    assert jobs.active() == ()
    print(f"final statuses {dict(seen)}")
    assert Status.CANCELLED in seen


@pytest.mark.parametrize("atomic", [False, True], ids=["exit", "cp.complete"])
def test_cancel_head_on_with_completion(alias, jobs, add, threads, atomic, monkeypatch):
    """Each cancel is released together with its worker's completion, lane after lane.

    Exactly one of them wins, neither errors, the job ends stopped. On MariaDB the
    deadlock retry is switched off: the transitions must not deadlock at all (they go
    through the primary key), since one inside the caller's transaction cannot be retried.
    """
    if alias == "mariadb":
        monkeypatch.setattr(django_backend, "_RETRIES", 1)
    lanes, per_lane = 6, 15
    ids = [add(session_id="head-on") for _ in range(lanes * per_lane)]
    returned: dict[int, bool] = {}

    def worker(lane: list[int], barrier: threading.Barrier) -> None:
        for job in lane:
            with jobs.run(job) as cp:
                barrier.wait(JOIN_TIMEOUT)
                if atomic:
                    with transaction.atomic(using=alias):
                        Result.objects.using(alias).create(analysis_id=job, value="done")
                        cp.complete(alias)

    def canceller(lane: list[int], barrier: threading.Barrier) -> None:
        for job in lane:
            barrier.wait(JOIN_TIMEOUT)
            returned[job] = jobs.cancel(job, reason="head-on")

    for n in range(lanes):
        lane = ids[n * per_lane : (n + 1) * per_lane]
        barrier = threading.Barrier(2)
        threads.start(lambda lane=lane, b=barrier: worker(lane, b), name=f"worker-{n}")
        threads.start(lambda lane=lane, b=barrier: canceller(lane, b), name=f"canceller-{n}")
    threads.join()

    results = Counter(
        Result.objects.using(alias)
        .filter(analysis_id__in=ids)
        .values_list("analysis_id", flat=True)
    )
    for job in ids:
        row = Analysis.objects.using(alias).get(pk=job)
        where = f"job {job}: cancel returned {returned.get(job)}, ended {row.status}"
        assert row.finished_at is not None, where
        if returned[job]:
            assert row.status == Status.CANCELLED, where
            assert results[job] == 0, where
        else:
            assert row.status == Status.COMPLETED, where
            assert results[job] == (1 if atomic else 0), where
    print(f"cancel won {sum(returned.values())}x of {len(ids)}")
