"""The media benchmark still runs: ``bench_media.py --quick --sqlite-only`` exits 0 with its table.

No timing is asserted here: speed claims live in the benchmark's own report, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("websockets")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_media.py"


@pytest.mark.sqlite
@pytest.mark.slow
def test_quick_media_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(BENCH), "--quick", "--sqlite-only"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert out.startswith("# dbcancel media benchmark"), out[:2000]
    assert "| row | measured | target | verdict |" in out
    for row in (
        "(d) messages/s through `receive()`",
        "(e) close latency, same process, SQLite",
        "(e) close latency, another process, SQLite",
        "(f) frames/s, `analyze()`",
    ):
        assert row in out, row
    # Every close frame the server saw after a cancel was 1001 "cancelled".
    assert "bad closes" not in out, out
