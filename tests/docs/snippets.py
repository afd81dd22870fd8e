"""Collect the fenced Python blocks of README.md and docs/, and run one.

A block runs as it is, in a fresh Python process whose working directory is an empty
temporary folder, unless the HTML comment on the line before its fence says otherwise:

* ``<!-- snippet: continues -->``: the block continues the previous Python block of the
  same page; it runs after that one (and whatever that one continues) in one process.
* ``<!-- snippet: part -->``: like ``continues``, and also the beginning of the next
  ``continues`` block (a worker that the next block cancels, say). It runs alone too,
  with what it continues, and must end within ``PART_TIMEOUT`` seconds: a reader who
  runs the blocks up to it must not wait for minutes.
* ``<!-- snippet: postgresql -->`` or ``<!-- snippet: mariadb -->``: the block needs that
  server; it runs against the test server, in a schema or database of its own (the
  block's literal URL is replaced by the test URL).
* ``<!-- snippet: pytest -->``: the block is a test module; pytest runs it and it must pass.
* ``<!-- snippet: excerpt PATH -->``: the block is an excerpt of the repository's file
  PATH (an example that tests of its own run); its lines must appear there, in order.
* ``<!-- snippet: skip REASON -->``: not run; the reason is required.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}
PART_TIMEOUT = 30.0
"""Seconds within which a ``part`` block, run alone with what it continues, must end."""
KINDS = {"run", "continues", "part", "postgresql", "mariadb", "pytest", "excerpt", "skip"}
_MARKER = re.compile(r"^<!--\s*snippet:\s*(\S+)\s*(.*?)\s*-->$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


class SnippetError(ValueError):
    """A page's snippet markup is wrong (unknown kind, missing reason, unclosed fence)."""


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block of a page."""

    path: Path
    line: int  # 1-based line of the opening fence
    kind: str
    argument: str
    source: str
    prelude: str = ""  # the blocks it continues, for kind "continues"

    @property
    def id(self) -> str:
        """``README.md:12`` or ``docs/flask.md:40``, for test ids and messages."""
        try:
            name = self.path.relative_to(ROOT).as_posix()
        except ValueError:
            name = self.path.name
        return f"{name}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def collect(path: Path) -> list[Snippet]:
    """Every fenced ``python`` block of ``path``, with the marker before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets: list[Snippet] = []
    previous: Snippet | None = None
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise SnippetError(f"{path}:{start + 1}: the fence {fence!r} is never closed")
        i += 1
        if info not in ("python", "py"):
            continue
        kind, argument = "run", ""
        before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = _MARKER.match(before)
        if marker:
            kind, argument = marker.group(1), marker.group(2)
        if kind not in KINDS:
            raise SnippetError(f"{path}:{start + 1}: unknown snippet kind {kind!r}")
        if kind in ("skip", "excerpt") and not argument:
            raise SnippetError(f"{path}:{start + 1}: 'snippet: {kind}' needs an argument")
        prelude = ""
        if kind in ("continues", "part"):
            if previous is None:
                raise SnippetError(f"{path}:{start + 1}: nothing before it to continue")
            prelude = previous.prelude + previous.source + "\n"
        snippet = Snippet(path, start + 1, kind, argument, "\n".join(body) + "\n", prelude)
        snippets.append(snippet)
        previous = snippet
    return snippets


def collect_all() -> list[Snippet]:
    """The snippets of every page."""
    return [s for page in pages() for s in collect(page)]


def run(snippet: Snippet, workdir: Path, url: str | None = None, timeout: float = 120) -> None:
    """Run ``snippet`` in ``workdir``; raise AssertionError with its output if it fails.

    ``url`` replaces the default server URL in the source for postgresql/mariadb blocks.
    """
    if snippet.kind == "skip":
        return
    if snippet.kind == "part":
        timeout = min(timeout, PART_TIMEOUT)
    if snippet.kind == "excerpt":
        _check_excerpt(snippet)
        return
    source = snippet.prelude + snippet.source
    if snippet.kind in DEFAULT_URLS:
        default = DEFAULT_URLS[snippet.kind]
        assert default in source, f"{snippet.id}: the block does not name {default}"
        if url is not None:
            source = source.replace(default, url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(workdir)
    if snippet.kind == "pytest":
        (workdir / "test_snippet.py").write_text(source, encoding="utf-8")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-W", "error", "test_snippet.py"]
    else:
        (workdir / "snippet.py").write_text(source, encoding="utf-8")
        command = [sys.executable, "-W", "error", "snippet.py"]
    try:
        proc = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{snippet.id} ({snippet.kind}) ran for more than {timeout:g}s; a block that "
            "runs alone must end in seconds"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"{snippet.id} failed (exit {proc.returncode}):\n{source}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )


def _check_excerpt(snippet: Snippet) -> None:
    target = ROOT / snippet.argument
    assert target.is_file(), f"{snippet.id}: no file {snippet.argument}"
    have = [ln.strip() for ln in target.read_text(encoding="utf-8").splitlines()]
    at = 0
    for line in (ln.strip() for ln in snippet.source.splitlines()):
        if not line or line == "...":
            continue
        try:
            at = have.index(line, at) + 1
        except ValueError:
            raise AssertionError(
                f"{snippet.id}: {line!r} is not in {snippet.argument} (after line {at})"
            ) from None
