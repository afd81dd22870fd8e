"""Every fenced Python block of README.md and docs/ runs, so that no snippet rots.

How a block runs is set by the marker before it: see ``tests/docs/snippets.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import IN_CI, SERVERS

from . import snippets
from .snippets import Snippet, SnippetError

ALL = snippets.collect_all()


def _marks(snippet: Snippet) -> list[pytest.MarkDecorator]:
    if snippet.kind in ("postgresql", "mariadb"):
        return [getattr(pytest.mark, snippet.kind)]
    return [pytest.mark.sqlite]


@pytest.fixture
def server_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """For a postgresql/mariadb block, a URL on the test server in a scope of its own."""
    snippet: Snippet = request.node.callspec.params["snippet"]
    if snippet.kind not in ("postgresql", "mariadb"):
        yield None
        return
    name = snippet.kind
    scope = f"dbcancel_doc_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(SERVERS[name], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            kind = "SCHEMA" if name == "postgresql" else "DATABASE"
            conn.execute(text(f"CREATE {kind} {scope}"))
    except Exception as err:  # any driver error means unreachable
        admin.dispose()
        message = f"{name} is not reachable: {err}"
        if IN_CI:
            pytest.fail(f"{message} (under CI=true every database must be up)")
        pytest.skip(message)
    base = make_url(SERVERS[name])
    if name == "postgresql":
        url = base.update_query_dict({"options": f"-csearch_path={scope}"})
        drop = f"DROP SCHEMA {scope} CASCADE"
    else:
        url = base.set(database=scope)
        drop = f"DROP DATABASE {scope}"
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(drop))
        admin.dispose()


@pytest.mark.parametrize(
    "snippet",
    [pytest.param(s, id=s.id, marks=_marks(s)) for s in ALL if s.kind != "skip"],
)
def test_snippet_runs(snippet: Snippet, server_url: str | None, tmp_path: Path) -> None:
    snippets.run(snippet, tmp_path, url=server_url)


def test_the_pages_have_snippets_and_few_skips() -> None:
    assert len(ALL) >= 30, len(ALL)
    skipped = [s for s in ALL if s.kind == "skip"]
    # Skips are for blocks that cannot run anywhere (a fragment of a larger program);
    # each says why. Keep them few: prefer a block that runs.
    assert len(skipped) <= len(ALL) // 5, [s.id for s in skipped]
    assert all(s.argument for s in skipped)


# -- the runner itself ------------------------------------------------------------------


def _page(tmp_path: Path, text_: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text_, encoding="utf-8")
    return page


def test_a_broken_block_fails_the_runner(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "Fine:\n\n```python\nx = 1\n```\n\nBroken:\n\n```python\nprint(undefined_name)\n```\n",
    )
    fine, broken = snippets.collect(page)
    snippets.run(fine, tmp_path)
    with pytest.raises(AssertionError, match="NameError: name 'undefined_name'"):
        snippets.run(broken, tmp_path)


def test_a_warning_in_a_block_fails_it(tmp_path: Path) -> None:
    page = _page(tmp_path, "```python\nimport warnings\nwarnings.warn('old')\n```\n")
    (block,) = snippets.collect(page)
    with pytest.raises(AssertionError, match="UserWarning: old"):
        snippets.run(block, tmp_path)


def test_a_failing_pytest_block_fails_the_runner(tmp_path: Path) -> None:
    page = _page(
        tmp_path, "<!-- snippet: pytest -->\n```python\ndef test_x():\n    assert 1 == 2\n```\n"
    )
    (block,) = snippets.collect(page)
    with pytest.raises(AssertionError, match="1 failed"):
        snippets.run(block, tmp_path)


def test_continues_runs_after_the_block_before(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "```python\nx = 41\n```\n\n```bash\necho not python\n```\n\n"
        "<!-- snippet: continues -->\n```python\nassert x + 1 == 42\n```\n",
    )
    first, second = snippets.collect(page)
    assert second.prelude == first.source + "\n"
    snippets.run(second, tmp_path)


def test_a_part_runs_with_the_block_after_it_and_alone(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "```python\nx = 1\n```\n\n<!-- snippet: part -->\n```python\nx += 1\n```\n\n"
        "<!-- snippet: continues -->\n```python\nassert x == 2\n```\n",
    )
    _first, part, last = snippets.collect(page)
    assert part.kind == "part"
    assert last.prelude == "x = 1\n\nx += 1\n\n"
    snippets.run(last, tmp_path)
    snippets.run(part, tmp_path)


def test_a_part_that_runs_long_alone_fails(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "```python\nimport time\n```\n\n<!-- snippet: part -->\n```python\ntime.sleep(60)\n```\n",
    )
    _first, part = snippets.collect(page)
    with pytest.raises(AssertionError, match="ran for more than 1s"):
        snippets.run(part, tmp_path, timeout=1)


def test_an_excerpt_must_match_its_file(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "<!-- snippet: excerpt examples/basic.py -->\n```python\n"
        "class Analysis(CancellableMixin, Base):\n    ...\n    user_id: Mapped[str] = "
        "mapped_column(String(64))\n```\n\n"
        "<!-- snippet: excerpt examples/basic.py -->\n```python\nnot_in_the_file()\n```\n",
    )
    good, bad = snippets.collect(page)
    snippets.run(good, tmp_path)
    with pytest.raises(AssertionError, match="not_in_the_file"):
        snippets.run(bad, tmp_path)


@pytest.mark.parametrize(
    "markup",
    [
        "<!-- snippet: skip -->\n```python\nx\n```\n",  # a skip without a reason
        "<!-- snippet: sometimes -->\n```python\nx\n```\n",  # an unknown kind
        "<!-- snippet: continues -->\n```python\nx\n```\n",  # nothing to continue
        "```python\nx = 1\n",  # a fence never closed
    ],
)
def test_bad_markup_is_refused(tmp_path: Path, markup: str) -> None:
    with pytest.raises(SnippetError):
        snippets.collect(_page(tmp_path, markup))
