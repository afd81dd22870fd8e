"""The cancel-latency SQL of docs/operations.md gives seconds on each database.

Each ``sql`` block marked ``<!-- sql: NAME -->`` runs on that database against rows whose
gaps are known, one of them across a minute boundary (where subtracting MariaDB
timestamps as numbers goes wrong).
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import text

from dbcancel import Status
from tests.models import Analysis

from .snippets import ROOT

PAGE = ROOT / "docs" / "operations.md"
_BLOCK = re.compile(r"<!-- sql: (\w+) -->\n```sql\n(.*?)```", re.S)


def queries() -> dict[str, str]:
    found = {name: sql.strip().rstrip(";") for name, sql in _BLOCK.findall(PAGE.read_text())}
    assert set(found) == {"sqlite", "postgresql", "mariadb"}, set(found)
    return found


def test_the_page_has_one_query_per_database():
    queries()


def test_cancel_latency_sql_gives_seconds(db):
    requested = dt.datetime(2026, 11, 30, 12, 0, 55, 400_000, tzinfo=dt.UTC)
    with db.sessions.begin() as s:
        s.add_all(
            [
                Analysis(
                    id=1,
                    status=Status.CANCELLED,
                    cancel_requested_at=requested,
                    cancel_observed_at=requested + dt.timedelta(seconds=0.25),
                    finished_at=requested + dt.timedelta(seconds=10.1),  # 12:01:05.5
                ),
                Analysis(  # cancelled while pending: no worker saw it
                    id=2,
                    status=Status.CANCELLED,
                    cancel_requested_at=requested,
                    finished_at=requested + dt.timedelta(microseconds=1500),
                ),
                Analysis(id=3, status=Status.IN_PROGRESS),  # not cancelled: not listed
            ]
        )
    with db.engine.connect() as conn:
        rows = conn.execute(text(queries()[db.name])).all()
    got = {row.id: (row.seen_s, row.stopped_s) for row in rows}
    assert set(got) == {1, 2}, rows
    assert float(got[1][0]) == pytest.approx(0.25, abs=1e-3)
    assert float(got[1][1]) == pytest.approx(10.1, abs=1e-3)
    assert got[2][0] is None
    # SQLite's julianday() counts whole milliseconds; the servers keep microseconds.
    resolution = 1e-3 if db.name == "sqlite" else 1e-6
    assert float(got[2][1]) == pytest.approx(0.0015, abs=resolution)
