"""The documentation builds with ``mkdocs build --strict``, and a broken link fails it.

The site is built once per module; the tests after the first read that build. They
check what the reference renders: no reStructuredText left raw, every public name with
its signature, no private class named.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import griffe
import pytest

from .snippets import ROOT

pytestmark = pytest.mark.slow

RAW_ROLE = re.compile(r":(class|func|meth|data|mod|attr|exc|obj|ref):")
"""A Sphinx role, which Markdown leaves as text."""
STRAY_LITERAL = re.compile(r"::\s*</p>")
"""A paragraph ending in a reST literal-block marker, which Markdown leaves as text."""
HEADING = re.compile(r'<h[1-6] id="(dbcancel[^"]*)" class="doc doc-heading"')
PRIVATE_BASES = ("JobsWorker", "JobsClient")
NO_CONSTRUCTOR = {
    "dbcancel.JobRun": "Jobs.run() makes it; its constructor is not public",
    "dbcancel.AsyncJobRun": "AsyncJobs.run() makes it; its constructor is not public",
}
"""Classes shown without a signature on purpose."""


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built from the repository, once for every test of this module."""
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = build(ROOT, out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def reference(site: Path) -> str:
    return (site / "reference" / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def package() -> Any:
    """dbcancel as mkdocstrings sees it: read statically by griffe, imports nothing."""
    return griffe.load("dbcancel", search_paths=[str(ROOT)])


def pages(site: Path) -> list[Path]:
    found = sorted(site.rglob("*.html"))
    assert len(found) > 10
    return found


def target(obj: Any) -> Any:
    """The object an alias (an import, an inherited member) stands for."""
    return obj.final_target if obj.is_alias else obj


def lookup(package: Any, path: str) -> Any:
    """The object at ``path``, through imports and inherited members as mkdocstrings goes."""
    obj = package
    for name in path.split(".")[1:]:
        obj = target(obj)
        obj = (obj.all_members if obj.is_class else obj.members)[name]
    return target(obj)


def headed(reference: str, identifier: str) -> str:
    """The rendered heading of ``identifier`` up to its docstring: name and signature."""
    start = reference.index(f'id="{identifier}" class="doc doc-heading"')
    return reference[start : reference.index('class="doc doc-contents', start)]


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_the_docs_build_strictly(site: Path, reference: str) -> None:
    for name in (
        "dbcancel.Jobs.cancel",  # the client side, inherited
        "dbcancel.Jobs.wait",
        "dbcancel.Jobs.run",  # the worker side, inherited
        "dbcancel.Jobs.from_backend",
        "dbcancel.backend.Backend",
        "dbcancel.checkpoint.checkpoint",
        "DBCancel.submit",
    ):
        assert name in reference, name
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "0.1.0" in changelog


def test_no_page_shows_restructuredtext(site: Path) -> None:
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(site)
        role = RAW_ROLE.search(text)
        assert role is None, f"{name}: raw role {text[role.start() - 80 : role.end() + 80]!r}"
        stray = STRAY_LITERAL.search(text)
        assert stray is None, f"{name}: stray '::' {text[stray.start() - 120 : stray.end()]!r}"


def test_the_docstrings_cross_references_are_links(reference: str) -> None:
    # What the roles became: links to the page's own headings, and code blocks.
    assert 'href="#dbcancel.Jobs"' in reference
    assert 'href="#dbcancel.backend.Backend"' in reference
    assert reference.count('<div class="highlight"><pre>') >= 10


def test_no_page_names_a_private_base_class(site: Path) -> None:
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        named = [name for name in PRIVATE_BASES if name in text]
        assert not named, f"{page.relative_to(site)} names {named}"


def documented_modules(package: Any) -> list[str]:
    """dbcancel, and every contrib module the reference page renders something of."""
    found = ["dbcancel"]
    page = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for identifier in re.findall(r"^::: (\S+)", page, re.MULTILINE):
        obj = lookup(package, identifier)
        module = obj if obj.is_module else obj.module
        if module.path.startswith("dbcancel.contrib") and module.path not in found:
            found.append(module.path)
    return found


def test_every_public_name_is_rendered_with_its_signature(package: Any, reference: str) -> None:
    headings = HEADING.findall(reference)
    shown: dict[str, str] = {}  # what each heading renders -> the heading
    for identifier in headings:
        shown.setdefault(lookup(package, identifier).canonical_path, identifier)
    modules = documented_modules(package)
    assert "dbcancel.contrib.flask" in modules
    assert "dbcancel.contrib.django.tasks" in modules
    assert "dbcancel.contrib.celery" in modules
    checked = 0
    for module_path in modules:
        module = lookup(package, module_path)
        for name in module.exports:
            obj = target(module.members[name])
            if obj.is_module and name in obj.members:
                # `from .checkpoint import checkpoint` rebinds the submodule's name.
                obj = target(obj.members[name])
            where = f"{module_path}.{name}"
            assert obj.canonical_path in shown, f"{where} is not in the API reference"
            identifier = shown[obj.canonical_path]
            signature = "doc-signature" in headed(reference, identifier)
            if obj.is_function:
                assert signature, f"{identifier} is shown without its signature"
            elif obj.is_class and "__init__" in obj.all_members:
                wanted = identifier not in NO_CONSTRUCTOR
                assert signature == wanted, f"{identifier}: signature shown: {signature}"
            checked += 1
    assert checked >= 30


def test_jobs_shows_its_constructors_parameters(reference: str) -> None:
    signature = text_of(headed(reference, "dbcancel.Jobs"))
    assert "Jobs(" in signature
    for parameter in ("bind", "model", "interval", "clock", "watch", "max_staleness", "heartbeat"):
        assert f"{parameter}:" in signature, parameter


def test_job_ids_are_typed_with_the_documented_alias(reference: str) -> None:
    signature = text_of(headed(reference, "dbcancel.Jobs.cancel"))
    assert "job_id: JobId" in signature
    assert 'id="dbcancel.JobId"' in reference
    assert 'href="#dbcancel.JobId"' in reference


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    for name in ("mkdocs.yml", "CHANGELOG.md", "README.md"):  # the docs include the last two
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "dbcancel", copy / "dbcancel")
    page = copy / "docs" / "concepts.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    proc = build(copy, tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr
