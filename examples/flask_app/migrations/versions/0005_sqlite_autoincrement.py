"""Make the analysis table ``AUTOINCREMENT`` on SQLite: a deleted analysis's id is never
given to a new one.

SQLite gives a new row the largest id plus one, so after the newest analysis was deleted
the next one got its id, and a late cancel or status request for the deleted analysis
reached the new one. ``CancellableMixin`` declares SQLite job tables ``AUTOINCREMENT``
(what ``create_all()`` makes); a table made before has to be rebuilt to get it, which
batch mode does (copy, drop, rename; indexes and the status CHECK constraint come along).
Other databases never reuse ids: nothing to do there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "analysis", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # SQLite writes an AUTOINCREMENT key inline, without its name: name it again.
    with op.batch_alter_table(
        "analysis", recreate="always", table_kwargs={"sqlite_autoincrement": False}
    ) as batch:
        batch.create_primary_key("pk_analysis", ["id"])
