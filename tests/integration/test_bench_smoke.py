"""The benchmark still runs: ``bench_core.py --quick --sqlite-only`` exits 0 with its table.

No timing is asserted here: speed claims live in the benchmark's own report, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_core.py"


@pytest.mark.sqlite
@pytest.mark.slow
def test_quick_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(BENCH), "--quick", "--sqlite-only"],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert out.startswith("# dbcancel core benchmark"), out[:2000]
    assert "| row | measured | target | verdict |" in out
    for row in ("(a) `cp()` per call", "(b) naive re-read", "(c) cancel latency p95"):
        assert row in out, row
