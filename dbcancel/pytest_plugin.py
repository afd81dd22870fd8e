"""The dbcancel pytest plugin: fixtures for testing your own cancellable code.

Registered through the `pytest11` entry point `dbcancel`, so installing dbcancel is
enough. Loading it imports nothing heavy (no SQLAlchemy engine, no Flask, Django or
websockets); each fixture imports what it needs when a test asks for it.

Fixtures:

* `dbcancel_clock` — a [`dbcancel.testing.FakeClock`][dbcancel.testing.FakeClock]; pass it as
  `Jobs(..., clock=dbcancel_clock)` and move time with `dbcancel_clock.advance(0.5)`.
* `dbcancel_url` — the database URL to test against: `--dbcancel-url`, else the
  `DBCANCEL_TEST_URL` environment variable, else a SQLite file in the test's temporary
  folder.
* `dbcancel_engine` — a SQLAlchemy Engine on `dbcancel_url`, disposed after the test
  (once dbcancel's runtime has given back the connections it keeps to it).

Marker: `@pytest.mark.dbcancel_clock(start=0.0)` sets the fake clock's first reading.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .testing import FakeClock

__all__ = ["dbcancel_clock", "dbcancel_engine", "dbcancel_url"]

URL_ENV = "DBCANCEL_TEST_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add `--dbcancel-url`."""
    group = parser.getgroup("dbcancel")
    group.addoption(
        "--dbcancel-url",
        dest="dbcancel_url",
        default=None,
        metavar="URL",
        help=f"database URL for the dbcancel_url/dbcancel_engine fixtures "
        f"(default: ${URL_ENV}, else SQLite in the test's tmp_path)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin's marker with its signature."""
    config.addinivalue_line(
        "markers",
        "dbcancel_clock(start=0.0): the first reading of the dbcancel_clock fixture",
    )


@pytest.fixture
def dbcancel_clock(request: pytest.FixtureRequest) -> FakeClock:
    """A fake monotonic clock with `.advance(seconds)`, for `Jobs(clock=...)`."""
    from .testing import FakeClock

    marker = request.node.get_closest_marker("dbcancel_clock")
    start: Any = 0.0
    if marker is not None:
        start = marker.kwargs.get("start", marker.args[0] if marker.args else 0.0)
    return FakeClock(start)


@pytest.fixture
def dbcancel_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL under test: --dbcancel-url, $DBCANCEL_TEST_URL, or SQLite."""
    url: str | None = request.config.getoption("dbcancel_url") or os.environ.get(URL_ENV)
    if url:
        return url
    return f"sqlite:///{tmp_path / 'dbcancel.db'}"


@pytest.fixture
def dbcancel_engine(dbcancel_url: str) -> Iterator[Engine]:
    """A SQLAlchemy Engine on `dbcancel_url`; create your tables on it in the test."""
    try:
        from sqlalchemy import create_engine
    except ImportError as err:  # pragma: no cover - exercised in a subprocess
        raise ImportError(
            "the dbcancel_engine fixture needs SQLAlchemy, which is not installed: "
            "pip install 'dbcancel[sqlalchemy]'"
        ) from err

    engine = create_engine(dbcancel_url)
    try:
        yield engine
    finally:
        # The runtime gives back what it holds of this database first: a connection
        # checked out by a poll in flight when the pool is disposed would be orphaned
        # and reported as a ResourceWarning in a later test. Jobs the test left running
        # keep theirs (they are the test's own business).
        from .testing import close_watchers

        with contextlib.suppress(TimeoutError):
            close_watchers(10.0)
        engine.dispose()
