"""The watcher benchmark still runs: ``bench_watch.py --quick --sqlite-only`` prints its table.

No timing is asserted here: speed claims live in the benchmark's own report, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_watch.py"


@pytest.mark.sqlite
@pytest.mark.slow
def test_quick_watch_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(BENCH), "--quick", "--sqlite-only"],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert out.startswith("# dbcancel watcher benchmark"), out[:2000]
    assert "| row | measured | target | verdict |" in out
    for row in (
        "(g) status queries/s, 1 running job, SQLite",
        "(g) status queries/s, 100 running jobs, SQLite",
        "(g) status queries/s, 1,000 running jobs, SQLite",
        "(h) cancel latency with PostgreSQL NOTIFY | not measured",
        "(i) `cp()` per call, watcher mode (SQLite)",
    ):
        assert row in out, row
