#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+.

``python3 tasks.py demo|test|test-all|check|build|docs|bench``. Each task creates the virtualenv
``.venv`` when it is missing, installs what the task needs into it, and runs the task
there, so a fresh clone needs no other setup. The install is skipped when nothing it
depends on changed since the last one: a stamp file in the virtualenv holds a hash of
``setup.cfg``, ``pyproject.toml``, the extra and the Python, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"

# The Pythons the package claims (setup.cfg classifiers); ``test-all`` runs the suite on
# each, in a virtualenv of its own. The first one is the one ``python3`` must be.
PYTHONS = {"3.11": ".venv", "3.12": ".venv-3.12", "3.13": ".venv-3.13"}

# What ``test-all`` runs on each: a marker expression, or None for everything. The
# stress, property, fault and benchmark tests (``slow``) exercise dbcancel's own logic,
# which does not change with the Python, so they run once, on the first one; every
# other test runs on all three (Django 6 only exists on 3.12+).
SELECTION: dict[str, str | None] = {"3.11": None, "3.12": "not slow", "3.13": "not slow"}


def _python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


PY = _python(VENV)


def _run(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.call([str(a) for a in args], cwd=ROOT, env=env)


def _stamp_of(extra: str | None, interpreter: str) -> str:
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    # How the clone is installed: a .venv installed otherwise is installed again.
    digest.update(f"extra={extra}\npython={interpreter}\nediting=compat\n".encode())
    return digest.hexdigest()


def _install(extra: str | None, venv_dir: Path = VENV, base: str | None = None) -> Path:
    """Make ``venv_dir`` hold ``.[extra]`` (editable) and return its Python.

    ``base`` is the interpreter that creates the virtualenv (default: this one). Nothing
    is installed when the stamp says the same files and extra were installed before;
    an editable install sees source changes without reinstalling.
    """
    if sys.version_info < (3, 11):  # noqa: UP036 - tasks.py runs before any install
        sys.exit(f"dbcancel needs Python 3.11+, this is {sys.version.split()[0]}")
    py = _python(venv_dir)
    if not py.exists():
        print(f"+ creating {venv_dir}", flush=True)
        if base is None:
            venv.EnvBuilder(with_pip=True).create(venv_dir)
        elif _run(base, "-m", "venv", venv_dir) != 0:
            sys.exit(f"{base} could not create {venv_dir}")
    # One stamp line per extra installed from the current files; `demo` (.[sqlalchemy])
    # needs no install after `test`, since .[dev] includes the package and SQLAlchemy.
    stamp_file = venv_dir / ".dbcancel-install-stamp"
    have = stamp_file.read_text().split() if stamp_file.exists() else []
    interpreter = str(base or sys.executable)
    want = _stamp_of(extra, interpreter)
    if want in have or (extra in (None, "sqlalchemy") and _stamp_of("dev", interpreter) in have):
        return py
    target = f".[{extra}]" if extra else "."
    if _run(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip") != 0:
        sys.exit("pip could not upgrade itself; see the output above")
    # compat: the clone itself goes on sys.path, where its regular package wins over the
    # namespace package that Python makes of the clone's folder when started from the
    # folder that holds it (setuptools' default editable mode imports through a finder
    # that comes after that search, and loses to it).
    compat = ("--config-settings", "editable_mode=compat")
    if _run(py, "-m", "pip", "install", "--quiet", *compat, "-e", target) != 0:
        sys.exit(f"installing {target} failed; see the output above")
    # Keep the stamps of extras installed from the same files; drop stale ones.
    fresh = [s for s in have if s in {_stamp_of(e, interpreter) for e in _EXTRAS}]
    stamp_file.write_text("\n".join([*fresh, want]) + "\n")
    return py


_EXTRAS = (None, "sqlalchemy", "dev", "docs")


def demo(args: list[str]) -> int:
    """Run the demo on an embedded SQLite database (through SQLAlchemy)."""
    _install("sqlalchemy")
    return _run(PY, "-m", "dbcancel", "demo", *args)


_VERSIONS = (
    "import sys, django, sqlalchemy; "
    "print(f'Python {sys.version.split()[0]}, Django {django.__version__}, "
    "SQLAlchemy {sqlalchemy.__version__}', flush=True)"
)


def _pytest(py: Path, args: list[str]) -> int:
    _run(py, "-c", _VERSIONS)
    code = _run(py, "-m", "pytest", *args)
    if code == 5:
        print("pytest collected no tests: that is a failure here", file=sys.stderr)
        return 1
    return code


WORKERS = os.environ.get("DBCANCEL_TEST_WORKERS", "4")
"""pytest-xdist workers of the parallel phase. Most of the suite waits on databases,
servers and sleeps rather than on the CPU, so four workers pay off on two cores."""

SLOWEST = "--durations=20"


def _phases(select: str | None) -> list[list[str]]:
    """The suite as two pytest runs: every test not marked ``serial`` on xdist workers
    (a module's tests stay on one worker, so its module fixtures start once), then the
    ``serial`` ones (timing-sensitive, or heavy enough to starve their neighbours) one at
    a time. ``select`` is a marker expression that narrows both (``"not slow"``)."""

    def marks(phase: str) -> str:
        return phase if select is None else f"({phase}) and ({select})"

    return [
        ["-n", WORKERS, "--dist", "loadscope", "-m", marks("not serial"), SLOWEST],
        ["-m", marks("serial"), SLOWEST],
    ]


def _suite(py: Path, select: str | None = None) -> int:
    """Run both phases; the first failure's exit code, or 0."""
    worst = 0
    for args in _phases(select):
        code = _pytest(py, args)
        worst = worst or code
    return worst


def test(args: list[str]) -> int:
    """Install .[dev] and run the whole suite on this Python (extra args go to pytest)."""
    py = _install("dev")
    if args:
        return _pytest(py, [SLOWEST, *args])
    return _suite(py)


def _find_python(version: str) -> str | None:
    """An interpreter of ``version`` (``"3.12"``) that runs, or None.

    ``python3.12`` on the PATH first; a pyenv shim is there even when that version is not
    selected (and then fails), so pyenv's own folder of versions is the fallback.
    """
    candidates = [shutil.which(f"python{version}")]
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [str(p) for p in sorted(root.glob(f"versions/{version}.*/bin/python{version}"))]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def test_all(args: list[str]) -> int:
    """Run the suite on Python 3.11, 3.12 and 3.13 (see SELECTION), each in its own venv."""
    results: list[tuple[str, int, float]] = []
    for version, name in PYTHONS.items():
        if sys.version_info[:2] == tuple(int(p) for p in version.split(".")):
            base = sys.executable
        else:
            found = _find_python(version)
            if found is None:
                print(f"python{version} is not installed: that is a failure here", file=sys.stderr)
                results.append((version, 1, 0.0))
                continue
            base = found
        start = time.monotonic()
        print(f"=== Python {version} in {name}", flush=True)
        py = _install("dev", ROOT / name, base)
        code = _pytest(py, [SLOWEST, *args]) if args else _suite(py, SELECTION[version])
        results.append((version, code, time.monotonic() - start))
    print("=== summary", flush=True)
    for version, code, seconds in results:
        verdict = "passed" if code == 0 else f"FAILED (exit {code})"
        selected = SELECTION[version] or "every test"
        print(f"Python {version} ({selected}): {verdict} in {seconds / 60:.1f} min", flush=True)
    total = sum(seconds for _, _, seconds in results)
    print(f"All Pythons: {total / 60:.1f} min", flush=True)
    return 0 if all(code == 0 for _, code, _ in results) else 1


def check(args: list[str]) -> int:
    """Install .[dev] and run ruff and mypy --strict."""
    _install("dev")
    return (
        _run(PY, "-m", "ruff", "check", ".")
        or _run(PY, "-m", "ruff", "format", "--check", ".")
        or _run(PY, "-m", "mypy")
    )


def docs(args: list[str]) -> int:
    """Build the docs with mkdocs --strict and serve them; `docs --build` only builds."""
    _install("dev")
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's banner about MkDocs 2
    if "--build" in args:
        with tempfile.TemporaryDirectory(prefix="dbcancel-site-") as site:
            return _run(PY, "-m", "mkdocs", "build", "--strict", "--site-dir", site)
    return _run(PY, "-m", "mkdocs", "serve", "--strict", *args)


def build(args: list[str]) -> int:
    """Build the wheel and the sdist into dist/ (what `pip install dist/...whl` takes)."""
    py = _install("dev")
    out = ROOT / "dist"
    return _run(py, "-m", "build", "--sdist", "--wheel", "--outdir", out, *args, ROOT)


BENCHMARKS = ("core", "media", "watch", "liveness", "celery", "asyncio", "fleet", "statements")


def bench(args: list[str]) -> int:
    """Install .[dev] and print a benchmark table: core (default), media, watch, liveness,
    celery, asyncio, fleet, statements"""
    name = args[0] if args and args[0] in BENCHMARKS else "core"
    rest = args[1:] if args and args[0] in BENCHMARKS else args
    _install("dev")
    return _run(PY, f"benchmarks/bench_{name}.py", *rest)


TASKS = {
    "demo": demo,
    "test": test,
    "test-all": test_all,
    "check": check,
    "build": build,
    "docs": docs,
    "bench": bench,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        names = "|".join(TASKS)
        print(f"usage: python3 tasks.py {names} [args...]", file=sys.stderr)
        for name, fn in TASKS.items():
            print(f"  {name:8} {fn.__doc__}", file=sys.stderr)
        return 2
    return TASKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
