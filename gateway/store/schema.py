"""The log's tables (SQLAlchemy Core): completions, their candidates, and feedback.

Knows column names and types for SQLite and PostgreSQL (JSON becomes JSONB there).
Alembic's migrations in ``migrations/`` create and change them; this module is what the
code reads and writes, and the first migration must match it (a test checks).
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()
Json = JSON().with_variant(JSONB(), "postgresql")

completions = Table(
    "completions",
    metadata,
    Column("id", String(96), primary_key=True),
    Column("created", Float, nullable=False, comment="UTC epoch seconds"),
    Column("key_id", String(128), nullable=False),
    Column("messages", Json, nullable=False),
    Column("params", Json, nullable=False),
    Column("policy_version", String(128), nullable=False),
    Column("rm_version", String(128)),
    Column("n_candidates", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("timings_ms", Json, nullable=False),
    Column("status", String(16), nullable=False, server_default="ok", comment="ok, or cancelled: the client left"),
    Index("ix_completions_created", "created"),
    Index("ix_completions_policy_rm", "policy_version", "rm_version", "created"),
)

candidates = Table(
    "candidates",
    metadata,
    Column("completion_id", String(96), ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("text", Text, nullable=False),
    Column("token_ids", Json, nullable=False),
    Column("token_count", Integer, nullable=False),
    Column("finish_reason", String(32)),
    Column("reward", Float),
    Column("scores", Json),
    Column("logprob_sum", Float),
    Column("logprob_mean", Float),
    Column("chosen", Boolean, nullable=False),
)

# no foreign key: a thumb may arrive (or be replayed from a spool) before its completion
feedback = Table(
    "feedback",
    metadata,
    Column("completion_id", String(96), primary_key=True),
    Column("key_id", String(128), nullable=False),
    Column("thumb", String(8), nullable=False),
    Column("comment", Text),
    Column("created", Float, nullable=False, comment="UTC epoch seconds of the latest thumb"),
    Index("ix_feedback_created", "created"),
)
