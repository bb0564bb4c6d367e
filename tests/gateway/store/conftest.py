"""Both SQL stores on real servers: an SQLite file and a PostgreSQL server started for the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.store.sql import SqlStore
from tests.postgres import Postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        store = SqlStore(f"sqlite:///{tmp_path / 'log.db'}")
    else:
        server: Postgres = request.getfixturevalue("postgres")
        store = SqlStore(server.url)
        with store.engine.begin() as conn:  # a clean schema per test
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    store.migrate()
    yield store
    store.close()
