"""Run the command blocks of an example's README, as a reader would, in one shell.

Every fenced ``bash`` block runs, in order, in one bash process (so that shell variables
carry from block to block), started in a scratch folder that stands for the repository
root (``examples`` there is a link to the repository's), under ``set -euo pipefail``. In
a ``console`` block only the lines that begin with ``$ `` are commands; the others show
output. The HTML comment on the line before a block's fence changes how it runs:

* ``<!-- commands: background [PORT] -->``: the block starts a server or a worker, which
  a reader runs in a terminal of its own: it runs in the background (its output goes to
  a log of its own), and the next block waits until 127.0.0.1:PORT accepts connections,
  when a PORT is given. Background blocks are stopped (SIGTERM, then SIGKILL) at the end.
* ``<!-- commands: skip REASON -->``: not run; the reason is required.

A console block without any ``$ `` line (output shown as an example) runs nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_MARKER = re.compile(r"^<!--\s*commands:\s*(\S+)\s*(.*?)\s*-->$")
_FENCE = re.compile(r"^(`{3,})\s*(\S*)")


class CommandsError(ValueError):
    """A README's command markup is wrong (unknown kind, missing reason or port)."""


@dataclass(frozen=True)
class Block:
    """The commands of one fenced block."""

    line: int
    kind: str  # "run", "background" or "skip"
    argument: str
    commands: str


def collect(path: Path) -> list[Block]:
    """Every ``bash`` and ``console`` block of ``path`` that has commands."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.groups()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if info not in ("bash", "console"):
            continue
        if info == "console":
            body = [ln[2:] for ln in body if ln.startswith("$ ")]
        kind, argument = "run", ""
        before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = _MARKER.match(before)
        if marker:
            kind, argument = marker.group(1), marker.group(2)
        if kind not in ("run", "background", "skip"):
            raise CommandsError(f"{path}:{start + 1}: unknown commands kind {kind!r}")
        if kind == "skip" and not argument:
            raise CommandsError(f"{path}:{start + 1}: 'commands: skip' needs a reason")
        if kind == "background" and argument and not argument.isdigit():
            raise CommandsError(f"{path}:{start + 1}: 'commands: background' takes a port")
        if body:
            blocks.append(Block(start + 1, kind, argument, "\n".join(body) + "\n"))
    return blocks


_PRELUDE = """\
set -euo pipefail
__pids=()
__stop() {
  for pid in "${__pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${__pids[@]}"; do
    for _ in $(seq 100); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap __stop EXIT
__wait_port() {
  "$__PYTHON" - "$1" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"nothing answers on port {sys.argv[1]} after 60 s")
        time.sleep(0.2)
PY
}
set -m  # each background block in a process group of its own, stopped as a whole
"""


def script(blocks: list[Block], logs: Path) -> str:
    """The bash script that runs ``blocks``; background blocks log to ``logs``/N.log."""
    parts = [_PRELUDE]
    for block in blocks:
        if block.kind == "skip":
            continue
        parts.append(f"# -- line {block.line}")
        if block.kind == "background":
            log = shlex.quote(str(logs / f"{block.line}.log"))
            parts.append(f": > {log}")  # there even if the block is stopped at once
            parts.append(f"( {block.commands.strip()}\n) > {log} 2>&1 &")
            parts.append('__pids+=("$!")')
            if block.argument:
                parts.append(f"__wait_port {block.argument}")
        else:
            parts.append(block.commands.rstrip())
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class Outcome:
    """What running a README's blocks printed: the foreground's, and each background
    block's log by the block's line."""

    returncode: int
    output: str
    background: dict[int, str]


def run(path: Path, env: dict[str, str], workdir: Path, timeout: float = 300) -> Outcome:
    """Run the command blocks of ``path`` in ``workdir``, as if at the repository root."""
    blocks = collect(path)
    (workdir / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    full = {
        **env,
        "__PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        ["bash", "-c", script(blocks, logs)],
        cwd=workdir,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        output += f"\n(timed out after {timeout:g} s)"
    background = {
        b.line: (logs / f"{b.line}.log").read_text(encoding="utf-8", errors="replace")
        for b in blocks
        if b.kind == "background" and (logs / f"{b.line}.log").exists()
    }
    return Outcome(proc.returncode, output, background)
