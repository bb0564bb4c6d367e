"""A completion's status: ``ok``, or ``cancelled`` when its client left before the answer was complete.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "completions",
        sa.Column("status", sa.String(16), nullable=False, server_default="ok", comment="ok, or cancelled: the client left"),
    )


def downgrade() -> None:
    op.drop_column("completions", "status")
