"""Bring ``analysis`` up to this dbcancel: ``worker_id`` and the worker table.

Databases migrated before this dbcancel get the column (and ``cancel_observed_at`` if
missing) and the worker table; on newer ones, where ``add_cancellation`` already made
them, it does nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.upgrade_cancellation("analysis")


def downgrade() -> None:
    # Older dbcancel versions ignore the column; the worker table goes, since this app
    # has no other job table that could still need it.
    op.drop_table("dbcancel_worker")
