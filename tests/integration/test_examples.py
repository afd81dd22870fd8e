"""The examples are real programs: run them as a user would, on every database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_basic_example(db):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "basic.py"), db.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "cancel -> True" in lines
    assert "wait   -> cancelled" in lines
    assert any(line.startswith("status -> cancelled after ") for line in lines)
    assert any("on_cancel" in line for line in lines)
