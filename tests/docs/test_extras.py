"""One extras table: the README's lists every extra of setup.cfg, and the docs include it."""

from __future__ import annotations

import configparser
import re

from .snippets import ROOT


def _extras_of_setup_cfg() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return list(config["options.extras_require"])


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"--8<-- \[start:extras\] -->\n(.*?)<!-- --8<-- \[end:extras\]", text, re.S)
    assert match, "README.md has no extras section for the docs to include"
    return match.group(1)


def test_the_readmes_table_lists_every_extra_once() -> None:
    rows = [ln for ln in _readme_table().splitlines() if ln.startswith("| `")]
    names = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]  # type: ignore[union-attr]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(_extras_of_setup_cfg())


def test_the_docs_include_the_readmes_table_and_have_none_of_their_own() -> None:
    page = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert '--8<-- "README.md:extras"' in page
    assert "| extra | installs | for |" not in page
