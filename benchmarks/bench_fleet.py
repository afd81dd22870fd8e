"""Fleet benchmark: cancel observe latency across N worker processes, pushed through
Redis, announced by PostgreSQL LISTEN/NOTIFY, or polled, and the connections each way
holds on the database server.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fleet.py                 # 40 workers, about a minute
    .venv/bin/python benchmarks/bench_fleet.py --workers 100 --cancels 40

It starts its own throwaway PostgreSQL (`max_connections=300`), a PgBouncer in
transaction pooling mode in front of it and a redis-server, on free loopback ports
(`tests/integration/servers.py`, `tests/integration/redis_server.py`), and forks the
workers from one launcher process (`tests/integration/fleet_launcher.py`: one job each,
`cp()` in a loop with a 10 ms sleep, interval 1 s). Three fleets, one after the other in
a shuffled order:

* **push**: through PgBouncer, `push="redis://..."`;
* **LISTEN**: straight to PostgreSQL (LISTEN needs a session of its own, which
  transaction pooling does not give), the default runtime;
* **poll**: through PgBouncer, no listener.

Each fleet gets `--cancels` cancels of random running jobs, 0-20 ms apart, from this
process. Latency is read from each row: `cancel_requested_at` (stamped by the canceller
before its UPDATE) to `cancel_observed_at` (when the worker's runtime saw the cancel).
"server backends" is the peak number of client backends on the server while the fleet
runs (sampled every 0.2 s; the sampling connection is not counted). A miss is a cancel
observed later than the row's target: 100 ms for push and LISTEN, the interval + 100 ms
for polling. The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CI", "true")  # a throwaway server that does not start fails loudly

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from dbcancel import Jobs  # noqa: E402
from tests.integration.fleet_launcher import Fleet, cancel_all, percentile  # noqa: E402
from tests.integration.redis_server import RedisServer  # noqa: E402
from tests.integration.servers import throwaway_pgbouncer  # noqa: E402
from tests.models import Analysis, Base  # noqa: E402

INTERVAL = 1.0


def announce(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Sampler:
    """The peak number of client backends on the server, sampled in a thread."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        query = text(
            "SELECT count(*) - 1 FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        with self.engine.connect() as conn:
            while not self._stop.wait(0.2):
                self.peak = max(self.peak, int(conn.execute(query).scalar_one()))
                conn.rollback()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        self.engine.dispose()
        return self.peak


def run_fleet(
    mode: str, bouncer: Any, redis_url: str, workers: int, cancels: int, rng: random.Random
) -> dict[str, Any]:
    push = redis_url if mode == "push" else None
    url = bouncer.direct_url if mode == "LISTEN" else bouncer.pooler_url
    launcher_mode = "poll" if mode == "poll" else "listen"
    sampler = Sampler(bouncer.direct_url)
    started = time.monotonic()
    fleet = Fleet(bouncer.direct_url, url, workers, push, launcher_mode, INTERVAL)
    engine = create_engine(url, connect_args={"prepare_threshold": None}, pool_size=2)
    try:
        up = fleet.wait_running(300)
        if mode != "poll":
            time.sleep(2.0)  # every worker's listener up (they poll once it is)
        canceller = Jobs(engine, Analysis, push=push, watch=False)
        done = cancel_all(canceller, rng.sample(fleet.ids, cancels), rng)
        time.sleep(INTERVAL * 1.1 + 1.0)
        failed = fleet.stop(120)
        rows = fleet.rows()
    finally:
        fleet.close()
        engine.dispose()
        peak = sampler.stop()
    lat = []
    unobserved = 0
    for job in done:
        row = rows[job]
        if row.cancel_observed_at is None or row.status != "cancelled":
            unobserved += 1
            continue
        lat.append((row.cancel_observed_at - row.cancel_requested_at).total_seconds())
    target = 0.100 if mode != "poll" else INTERVAL + 0.100
    return {
        "mode": mode,
        "up": up,
        "took": time.monotonic() - started,
        "cancels": len(done),
        "p50": percentile(0.5, lat) if lat else float("nan"),
        "p95": percentile(0.95, lat) if lat else float("nan"),
        "max": max(lat) if lat else float("nan"),
        "misses": sum(1 for v in lat if v > target) + unobserved,
        "target": target,
        "backends": peak,
        "failed": failed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=40)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    load_start = os.getloadavg()[0]
    announce(f"fleet benchmark: {args.workers} workers x 3 fleets, about a minute or more")
    bouncer = throwaway_pgbouncer({"max_connections": 300}, default_pool_size=20)
    redis = RedisServer()
    redis.start()
    try:
        engine = create_engine(bouncer.direct_url, poolclass=NullPool)
        Base.metadata.create_all(engine)
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
        engine.dispose()
        modes = ["push", "LISTEN", "poll"]
        rng.shuffle(modes)
        results = {}
        for mode in modes:
            announce(f"  {mode}: {args.workers} workers")
            results[mode] = run_fleet(mode, bouncer, redis.url, args.workers, args.cancels, rng)
    finally:
        redis.kill()
        bouncer.remove()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"Python {platform.python_version()} · PostgreSQL {version} · git {commit} · "
        f"{os.cpu_count()} CPUs · {args.workers} workers, {args.cancels} cancels each, "
        f"interval {INTERVAL} s · order {', '.join(modes)} · seed {seed} · "
        f"load avg at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| fleet | all running after | cancels | p50 ms | p95 ms | max ms | target | misses "
        "| server backends (peak) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("push", "LISTEN", "poll"):
        r = results[mode]
        print(
            f"| {mode} | {r['up']:.1f} s | {r['cancels']} | {r['p50'] * 1000:.0f} | "
            f"{r['p95'] * 1000:.0f} | {r['max'] * 1000:.0f} | {r['target'] * 1000:.0f} ms | "
            f"{r['misses']} | {r['backends']} |"
        )
    failed = sum(r["failed"] for r in results.values())
    if failed:
        print(f"\n{failed} workers failed")
    missed = any(r["misses"] for r in results.values())
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
