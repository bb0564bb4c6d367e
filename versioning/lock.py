"""One training round at a time, even outside Kubernetes; one canary decision at a time across gateways.

With a PostgreSQL log (many replicas, trainers on several machines) a lock is a
PostgreSQL session advisory lock, held on its own connection and released when the
connection closes (so a killed process never leaves it held). Otherwise it is an
exclusive ``flock`` on a file in the registry (``.round.lock``, ``.gate.lock``), which
the kernel releases when the process dies. Never blocks: a second holder finds the lock
held and is told so.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

ROUND_LOCK_ID = 0x626F6E_01  # "bon" + 1; the migration lock is 0x626F6E
GATE_LOCK_ID = 0x626F6E_02


class LockHeld(Exception):
    """Another process holds the lock."""


@contextmanager
def round_lock(registry_dir: Path, database_url: str | None = None) -> Iterator[None]:
    with _lock(registry_dir / ".round.lock", ROUND_LOCK_ID, database_url, "another training round"):
        yield


@contextmanager
def gate_lock(registry_dir: Path, database_url: str | None = None) -> Iterator[None]:
    """Held while a gateway reads the canary's totals and moves the pointers (one decision for many replicas)."""
    with _lock(registry_dir / ".gate.lock", GATE_LOCK_ID, database_url, "another gateway's canary gate"):
        yield


@contextmanager
def _lock(path: Path, lock_id: int, database_url: str | None, holder: str) -> Iterator[None]:
    if database_url is not None and database_url.startswith("postgresql"):
        with _advisory_lock(database_url, lock_id, holder):
            yield
    else:
        with _file_lock(path, holder):
            yield


@contextmanager
def _file_lock(path: Path, holder: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{holder} holds {path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _advisory_lock(url: str, lock_id: int, holder: str) -> Iterator[None]:
    engine = create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            held = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": lock_id}).scalar_one()
            conn.commit()
            if not held:
                raise LockHeld(f"{holder} holds the database's lock {lock_id:#x}")
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
                conn.commit()
    finally:
        engine.dispose()
