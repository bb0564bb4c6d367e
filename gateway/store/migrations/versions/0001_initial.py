"""The log's first schema: completions, candidates, feedback.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", sa.String(96), primary_key=True),
        sa.Column("created", sa.Float, nullable=False, comment="UTC epoch seconds"),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("messages", Json, nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("policy_version", sa.String(128), nullable=False),
        sa.Column("rm_version", sa.String(128)),
        sa.Column("n_candidates", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("timings_ms", Json, nullable=False),
    )
    op.create_index("ix_completions_created", "completions", ["created"])
    op.create_index("ix_completions_policy_rm", "completions", ["policy_version", "rm_version", "created"])
    op.create_table(
        "candidates",
        sa.Column("completion_id", sa.String(96), sa.ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("token_ids", Json, nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("reward", sa.Float),
        sa.Column("scores", Json),
        sa.Column("logprob_sum", sa.Float),
        sa.Column("logprob_mean", sa.Float),
        sa.Column("chosen", sa.Boolean, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("completion_id", sa.String(96), primary_key=True),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("thumb", sa.String(8), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("created", sa.Float, nullable=False, comment="UTC epoch seconds of the latest thumb"),
    )
    op.create_index("ix_feedback_created", "feedback", ["created"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("candidates")
    op.drop_index("ix_completions_policy_rm", "completions")
    op.drop_index("ix_completions_created", "completions")
    op.drop_table("completions")
