"""Give the worker table ``expires_at``: until when a worker's last beat keeps it alive.

Each beat of this dbcancel writes it (the beat's time plus three heartbeat periods, on
the database's clock), and ``reap()`` spares a worker until it has passed, whatever
``stale_after`` the reaper passes. ``upgrade_cancellation`` adds whatever a newer
dbcancel needs and is missing, here the one column; where it is already there (a
database made by ``create_all()``, or by 0003 with this dbcancel), it does nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.upgrade_cancellation("analysis")


def downgrade() -> None:
    # Older dbcancel versions never name the column; dropping it leaves the table as
    # 0003 made it before. SQLite drops it in batch mode (the table is copied).
    with op.batch_alter_table("dbcancel_worker") as batch:
        batch.drop_column("expires_at")
