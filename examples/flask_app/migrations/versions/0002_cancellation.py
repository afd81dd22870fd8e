"""Make analyses cancellable: dbcancel's status and timestamp columns on ``analysis``.

Existing analyses become ``pending``; their data is kept.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Registered by `import dbcancel.migrations` in env.py.
    op.add_cancellation("analysis")


def downgrade() -> None:
    op.drop_cancellation("analysis")
