"""The benchmarks still run: each ``bench_*.py --quick --sqlite-only`` prints its table.

No timing is asserted here: speed claims live in the benchmarks' own reports, not in tests.
A run exits 0 when every target row was met and 1 when one says MISSED (a quick run on a
busy machine may miss one), so the test checks that the exit status agrees with the table.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

CASES = [
    pytest.param(
        "bench_core.py",
        "core",
        (
            "(a) default-mode `cp()`",
            "(a) threadless `cp()`",
            "(b) naive re-read",
            "(c) cancel latency p95",
        ),
        150,
        id="core",
    ),
    pytest.param(
        "bench_media.py",
        "media",
        (
            "(d) messages/s through `receive()`",
            "(e) close latency, same process, SQLite",
            "(e) close latency, another process, SQLite",
            "(f) frames/s, `analyze()`",
        ),
        170,
        marks=pytest.mark.skipif(
            importlib.util.find_spec("websockets") is None, reason="needs dbcancel[media]"
        ),
        id="media",
    ),
    pytest.param(
        "bench_watch.py",
        "watcher",
        (
            "(g) status queries/s, 1 running job, SQLite",
            "(g) status queries/s, 100 running jobs, SQLite",
            "(g) status queries/s, 1,000 running jobs, SQLite",
            "(h) cancel latency with PostgreSQL NOTIFY | not measured",
            "(i) `cp()` per call, watcher mode (SQLite)",
        ),
        150,
        id="watch",
    ),
    pytest.param(
        "bench_liveness.py",
        "liveness",
        (
            "(j) heartbeat row writes, 1,000 jobs in 1 process, SQLite",
            "(j) heartbeat row writes, 1,000 jobs in 10 processes, SQLite",
        ),
        150,
        id="liveness",
    ),
    pytest.param(
        "bench_asyncio.py",
        "asyncio",
        (
            "(k) `cp()` per call, `AsyncJobs` job (SQLite)",
            "(l) cancel latency, same process, `cancel_task=True`",
            "(m) cancel latency with PostgreSQL NOTIFY | not measured",
            "(n) loop blocking, 200 jobs running, 20 cancels + waits awaited, SQLite",
            "(o) threads used by 200 concurrent `await jobs.wait()`, SQLite",
        ),
        120,
        id="asyncio",
    ),
]


@pytest.mark.sqlite
@pytest.mark.slow
@pytest.mark.parametrize(("script", "title", "rows", "timeout"), CASES)
def test_quick_benchmark_prints_its_table(
    script: str, title: str, rows: tuple[str, ...], timeout: float
) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(BENCHMARKS / script), "--quick", "--sqlite-only"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = result.stdout
    missed = [ln for ln in out.splitlines() if ln.startswith("| ") and "MISSED" in ln]
    assert result.returncode == (1 if missed else 0), result.stderr[-4000:]
    assert "[bench] a quick (--quick) run: under a minute" in result.stderr.splitlines()[0]
    assert out.startswith(f"# dbcancel {title} benchmark"), out[:2000]
    assert "| row | measured | target | verdict |" in out
    for row in rows:
        assert row in out, row
    # Every close frame the media server saw after a cancel was 1001 "cancelled".
    assert "bad closes" not in out, out


@pytest.mark.postgresql
@pytest.mark.slow
def test_the_statements_benchmark_runs_a_small_fleet() -> None:
    """`bench_statements.py` on 2 processes for 2 s: its throwaway server, both fleets
    and its table (scaled to 100 processes)."""
    from tests.integration.servers import PG_BIN, unavailable

    if not (PG_BIN / "initdb").exists():
        unavailable(f"no PostgreSQL binaries in {PG_BIN}")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_statements.py"),
            "--processes",
            "2",
            "--window",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    out = result.stdout
    missed = [ln for ln in out.splitlines() if ln.startswith("| ") and "MISSED" in ln]
    assert result.returncode == (1 if missed else 0), result.stderr[-4000:]
    assert "2 processes x 10 jobs = 20 jobs" in out
    assert "| default (watched) |" in out
    assert "| per job (watch=False) |" in out
    assert "(100 processes, scaled x 50)" in out
