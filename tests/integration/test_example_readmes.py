"""The examples' READMEs, run as a reader runs them: every command block, in order, in
one shell, the servers and workers in the background (see ``tests/docs/commands.py``).

Each example's database is a SQLite file of the test's own; the Celery example's queue is
the test's own, so that no other worker on the shared broker takes its tasks.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.docs import commands

from .example_modules import EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.sqlite]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    root = commands.ROOT
    return {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'example.db'}",
        "PYTHONPATH": str(root),  # this checkout's dbcancel, whatever the venv installed
        **extra,
    }


def _ran(outcome: commands.Outcome) -> str:
    logs = "\n".join(
        f"--- background block at line {n}\n{text}" for n, text in outcome.background.items()
    )
    return f"--- foreground\n{outcome.output}\n{logs}"


def test_every_example_has_a_readme_with_commands() -> None:
    for folder in ("celery_app", "django_app", "flask_app"):
        readme = EXAMPLES / folder / "README.md"
        assert readme.is_file(), readme
        assert commands.collect(readme), readme


def test_the_celery_readme(tmp_path: Path) -> None:
    outcome = commands.run(
        EXAMPLES / "celery_app" / "README.md",
        _env(tmp_path, QUEUE=f"dbcancel-readme-{uuid.uuid4().hex[:8]}"),
        tmp_path,
        timeout=180,
    )
    assert outcome.returncode == 0, _ran(outcome)
    out = outcome.output
    assert "stopped: cancelled" in out, _ran(outcome)
    assert "celery: REVOKED" in out
    assert "kept: completed 5" in out
    (worker,) = outcome.background.values()
    for line in ("started: 600 files", "cancelled: user deleted it", "completed: 5 files"):
        assert line in worker, _ran(outcome)


def test_the_django_readme(tmp_path: Path) -> None:
    outcome = commands.run(
        EXAMPLES / "django_app" / "README.md",
        _env(tmp_path, ANALYSIS_WORK_DIR=str(tmp_path / "work")),
        tmp_path,
        timeout=240,
    )
    assert outcome.returncode == 0, _ran(outcome)
    assert "OK: cancelled midway, stopped, deleted" in outcome.output, _ran(outcome)
    assert '"status": "cancelled"' in outcome.output, _ran(outcome)
    server, worker = outcome.background.values()
    assert "cancel requested by reader" in server, _ran(outcome)
    assert "stopped (cancelled)" in server, _ran(outcome)
    assert "started:" in worker, _ran(outcome)
    assert "cancelled: deleted by its owner" in worker, _ran(outcome)
    assert "Traceback" not in worker, _ran(outcome)
    assert "state=FAILED (JobCancelled: Analysis" in worker, _ran(outcome)


# -- the runner ------------------------------------------------------------------------


def test_the_runner_runs_blocks_in_one_shell_and_servers_in_the_background(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- commands: background -->\n```bash\necho serving; sleep 60\n```\n\n"
        "```bash\nX=41\nsleep 1\n```\n\n```console\n$ echo $((X + 1))\n42\n```\n\n"
        "<!-- commands: skip not here -->\n```bash\nexit 3\n```\n",
        encoding="utf-8",
    )
    work = tmp_path / "work"
    work.mkdir()
    outcome = commands.run(readme, dict(os.environ), work, timeout=60)
    assert outcome.returncode == 0, _ran(outcome)
    assert outcome.output.strip() == "42"
    assert list(outcome.background.values()) == ["serving\n"]


def test_the_runner_fails_on_a_failing_command_and_bad_markup(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("```bash\nfalse\necho not reached\n```\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    outcome = commands.run(readme, dict(os.environ), work, timeout=60)
    assert outcome.returncode != 0
    assert "not reached" not in outcome.output
    readme.write_text("<!-- commands: skip -->\n```bash\nx\n```\n", encoding="utf-8")
    with pytest.raises(commands.CommandsError):
        commands.collect(readme)
