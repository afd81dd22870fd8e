"""The distributions a release would upload: what the wheel and the sdist contain.

Builds both with ``python -m build`` (in an isolated environment, so it needs PyPI or a
pip cache for setuptools) into a temporary folder and lists their files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib.metadata import metadata, version
from pathlib import Path

import pytest

import dbcancel

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_metadata():
    assert dbcancel.__version__ == version("dbcancel")
    assert dbcancel.__version__ != "0+unknown"


def test_metadata_names_author_and_licence_and_no_project_urls():
    meta = metadata("dbcancel")
    assert meta["Author"] == "The dbcancel authors"
    assert "MIT" in (meta.get("License-Expression") or meta.get("License") or "")
    assert meta.get_all("Project-URL") is None
    assert meta.get("Home-page") is None


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
def test_wheel_holds_the_package_typing_marker_and_licence(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
    stem = f"dbcancel-{dbcancel.__version__}"
    assert dists["wheel"].name.startswith(stem.replace("-", "-", 1))
    assert "dbcancel/__init__.py" in names
    assert "dbcancel/py.typed" in names
    assert "dbcancel/contrib/django/management/commands/dbcancel.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert f"{stem}.dist-info/entry_points.txt" in names
    # The package only: no tests, examples, docs or benchmarks in what users install.
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dbcancel", f"{stem}.dist-info"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.slow
def test_sdist_holds_what_it_takes_to_test_and_document(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "setup.cfg",
        "pyproject.toml",
        "MANIFEST.in",
        "tasks.py",
        "mkdocs.yml",
        "dbcancel/__init__.py",
        "dbcancel/py.typed",
        "tests/conftest.py",
        "tests/docs/test_snippets.py",
        "docs/index.md",
        "examples/basic.py",
        "benchmarks/bench_core.py",
    ):
        assert required in names, required
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".db"))]
    assert not [n for n in names if n.startswith((".venv", ".git/", "site/"))]


def _readme_quick_start() -> str:
    """The README's quick start: its first Python block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Quick start.*?```python\n(.*?)```", text, re.S)
    assert match, "the README has no quick start block"
    return match.group(1)


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _clean_env() -> dict[str, str]:
    """This process's environment without what would let the test's own packages in."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_quick_start(dists, tmp_path):
    """What the README's install section says, as a user does it: the built wheel with
    the sqlalchemy extra into a new virtualenv, then the quick start, run from a folder
    that also holds a folder named dbcancel (a clone's), which must not shadow it."""
    py = _fresh_venv(tmp_path / "venv")
    _run([str(py), "-m", "pip", "install", "--quiet", f"{dists['wheel']}[sqlalchemy]"], tmp_path)
    work = tmp_path / "project"
    (work / "dbcancel").mkdir(parents=True)  # the clone's folder, beside the user's code
    (work / "quickstart.py").write_text(_readme_quick_start(), encoding="utf-8")
    proc = _run([str(py), "-W", "error", "quickstart.py"], work)
    assert proc.stdout.strip().splitlines()[-1] == "cancelled"


@pytest.mark.slow
def test_an_editable_install_is_not_shadowed_by_the_clones_folder(tmp_path):
    """tasks.py's editable install (compat mode), with Python started from the folder
    that holds the clone, named dbcancel as a clone is: the package, not the folder."""
    py = _fresh_venv(tmp_path / "venv")
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "dbcancel").symlink_to(ROOT, target_is_directory=True)
    _run(
        [
            str(py),
            *("-m", "pip", "install", "--quiet", "--config-settings", "editable_mode=compat"),
            *("-e", "./dbcancel"),
        ],
        holder,
    )
    code = "import dbcancel; print(dbcancel.__file__); dbcancel.Jobs"
    proc = _run([str(py), "-c", code], holder)
    assert proc.stdout.strip() == str(ROOT / "dbcancel" / "__init__.py")
