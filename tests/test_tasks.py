"""tasks.py installs only when setup.cfg, pyproject.toml or the extra changed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """tasks.py working on a copy of the two files it hashes, recording what it runs."""
    spec = importlib.util.spec_from_file_location("tasks_under_test", ROOT / "tasks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    ran: list[tuple[str, ...]] = []

    def run(*args: str | os.PathLike[str], env: object = None) -> int:
        ran.append(tuple(str(a) for a in args))
        return 0

    monkeypatch.setattr(module, "_run", run)
    module.ran = ran
    # An existing virtualenv: its python is this interpreter.
    bin_dir = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin")
    bin_dir.mkdir(parents=True)
    (bin_dir / Path(module._python(tmp_path / "venv")).name).symlink_to(sys.executable)
    return module


def pip_installs(tasks) -> list[tuple[str, ...]]:
    return [args for args in tasks.ran if "pip" in args and "install" in args]


def test_a_second_install_of_the_same_extra_runs_nothing(tasks, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    tasks._install("dev", venv)
    assert len(pip_installs(tasks)) == 2  # pip itself, then the package
    tasks.ran.clear()
    tasks._install("dev", venv)
    tasks._install(None, venv)  # .[dev] includes the package itself
    tasks._install("sqlalchemy", venv)  # ... and SQLAlchemy, which the demo needs
    assert tasks.ran == []


def test_a_changed_setup_cfg_or_extra_installs_again(tasks, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    tasks._install(None, venv)
    tasks.ran.clear()
    tasks._install("docs", venv)
    assert pip_installs(tasks)[-1][-1] == ".[docs]"
    tasks.ran.clear()
    (tmp_path / "setup.cfg").write_text((tmp_path / "setup.cfg").read_text() + "\n# changed\n")
    tasks._install("docs", venv)
    assert pip_installs(tasks)[-1][-1] == ".[docs]"


def test_the_clone_is_installed_editable_in_compat_mode(tasks, tmp_path: Path) -> None:
    """compat puts the clone on sys.path, so that Python started from the folder that
    holds the clone imports the package, not the clone's folder as a namespace."""
    tasks._install("dev", tmp_path / "venv")
    install = pip_installs(tasks)[-1]
    assert install[-2:] == ("-e", ".[dev]")
    assert install[-4:-2] == ("--config-settings", "editable_mode=compat")


def _runs(expression: str, marks: set[str]) -> bool:
    from _pytest.mark.expression import Expression

    return bool(Expression.compile(expression).evaluate(lambda name: name in marks))


@pytest.mark.parametrize(
    "marks",
    [set(), {"slow"}, {"serial"}, {"slow", "serial"}, {"sqlite", "slow"}],
    ids=lambda marks: "+".join(sorted(marks)) or "unmarked",  # the same in every xdist worker
)
def test_every_test_runs_in_exactly_one_phase_on_some_python(tasks, marks: set[str]) -> None:
    """test-all narrows what runs on the later Pythons: a test with any mix of the
    suite's markers still runs on one of them, in exactly one of its two phases."""
    runs = []
    for version, select in tasks.SELECTION.items():
        expressions = [args[args.index("-m") + 1] for args in tasks._phases(select)]
        phases = [e for e in expressions if _runs(e, marks)]
        assert len(phases) <= 1, (version, phases)
        runs += [version] * len(phases)
    assert runs, f"a test marked {marks or 'nothing'} runs on no Python"
    assert tasks.SELECTION[next(iter(tasks.PYTHONS))] is None  # the first runs everything


def test_the_suite_fails_when_a_phase_collects_nothing(tasks, tmp_path: Path, monkeypatch) -> None:
    codes = iter([0, 5])
    monkeypatch.setattr(
        tasks, "_run", lambda *args, env=None: next(codes, 0) if "pytest" in args else 0
    )
    assert tasks._suite(tmp_path / "venv" / "bin" / "python") == 1
