#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+: ``python3 tasks.py demo|test|check|bench``.

Each task creates the virtualenv ``.venv`` when it is missing, installs what the task
needs into it, and runs the task there, so a fresh clone needs no other setup.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*args: str | os.PathLike[str]) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.call([str(a) for a in args], cwd=ROOT)


def _install(extra: str | None) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - tasks.py runs before any install
        sys.exit(f"dbcancel needs Python 3.11+, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    target = f".[{extra}]" if extra else "."
    if _run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip") != 0:
        sys.exit("pip could not upgrade itself; see the output above")
    if _run(PY, "-m", "pip", "install", "--quiet", "-e", target) != 0:
        sys.exit(f"installing {target} failed; see the output above")


def demo(args: list[str]) -> int:
    """Run the demo on an embedded SQLite database."""
    _install(None)
    return _run(PY, "-m", "dbcancel", "demo", *args)


def test(args: list[str]) -> int:
    """Install .[dev] and run the whole test suite (extra args go to pytest)."""
    _install("dev")
    code = _run(PY, "-m", "pytest", *args)
    if code == 5:
        print("pytest collected no tests: that is a failure here", file=sys.stderr)
        return 1
    return code


def check(args: list[str]) -> int:
    """Install .[dev] and run ruff and mypy --strict."""
    _install("dev")
    return (
        _run(PY, "-m", "ruff", "check", ".")
        or _run(PY, "-m", "ruff", "format", "--check", ".")
        or _run(PY, "-m", "mypy")
    )


BENCHMARKS = ("core", "media", "watch")


def bench(args: list[str]) -> int:
    """Install .[dev] and print a benchmark table: core (default), media or watch."""
    name = args[0] if args and args[0] in BENCHMARKS else "core"
    rest = args[1:] if args and args[0] in BENCHMARKS else args
    _install("dev")
    return _run(PY, f"benchmarks/bench_{name}.py", *rest)


TASKS = {"demo": demo, "test": test, "check": check, "bench": bench}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        names = "|".join(TASKS)
        print(f"usage: python3 tasks.py {names} [args...]", file=sys.stderr)
        for name, fn in TASKS.items():
            print(f"  {name:6} {fn.__doc__}", file=sys.stderr)
        return 2
    return TASKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
