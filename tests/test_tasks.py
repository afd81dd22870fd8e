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
