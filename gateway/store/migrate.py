"""Schema migrations with Alembic, run programmatically (no alembic.ini to keep in sync).

Knows where the migration scripts are and how to upgrade a database to the newest one.
On PostgreSQL the upgrade holds an advisory lock, so gateway replicas starting together
migrate once. ``python -m alembic`` is not needed; the CLI is ``python -m gateway migrate``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_ID = 0x626F6E  # "bon": the advisory lock replicas take while migrating


def config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
            try:
                command.upgrade(config(engine), revision)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
                conn.commit()
    else:
        command.upgrade(config(engine), revision)


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
