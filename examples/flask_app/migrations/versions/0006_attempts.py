"""Give the analysis table ``attempts``: how many times a worker started each job.

A task queue's retry moves a job back to ``pending`` and keeps the count, so that the row
says which attempt runs (``upgrade_cancellation`` adds it, not null with a server default
of 0, where it is missing; where it is there already, a database made by
``create_all()`` with this dbcancel, it does nothing).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.upgrade_cancellation("analysis")


def downgrade() -> None:
    # Older dbcancel versions never name the column. SQLite drops it in batch mode.
    with op.batch_alter_table("analysis") as batch:
        batch.drop_column("attempts")
