"""One training round at a time, even outside Kubernetes.

With a PostgreSQL log (many replicas, trainers on several machines) the lock is a
PostgreSQL session advisory lock, held on its own connection for the round and released
when the connection closes (so a killed trainer never leaves it held). Otherwise it is
an exclusive ``flock`` on ``<registry>/.round.lock``, which the kernel releases when the
process dies. Never blocks: a second round finds the lock held and is told so.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

ROUND_LOCK_ID = 0x626F6E_01  # "bon" + 1; the migration lock is 0x626F6E


class LockHeld(Exception):
    """Another round holds the lock."""


@contextmanager
def round_lock(registry_dir: Path, database_url: str | None = None) -> Iterator[None]:
    if database_url is not None and database_url.startswith("postgresql"):
        with _advisory_lock(database_url):
            yield
    else:
        with _file_lock(registry_dir / ".round.lock"):
            yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"another training round holds {path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    engine = create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            held = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": ROUND_LOCK_ID}).scalar_one()
            conn.commit()
            if not held:
                raise LockHeld("another training round holds the database's round lock")
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ROUND_LOCK_ID})
                conn.commit()
    finally:
        engine.dispose()
