"""The local spool: records the database could not take yet, as fsync'd JSONL files.

Knows how to append a batch durably (one ``write`` + ``fsync`` per batch), and how to hand
its contents back for replay: the live file is renamed to a numbered ``.replay`` file
first, so appends never race the replay, and a replay file is deleted only once its
records are in the database. A crash during replay leaves the file for the next start;
the store's idempotent writes make a second replay harmless. A record the database refuses
while it answers (a NUL character, a lone surrogate) is moved to ``quarantine.jsonl`` with
the database's reason, for a person to look at; it never blocks the records after it.
Thread-safe.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from gateway.store.records import Record, from_json, to_json


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._live = directory / "spool.jsonl"
        self.quarantine_path = directory / "quarantine.jsonl"
        self._lock = threading.Lock()
        _drop_torn_tail(self._live)
        self._pending = sum(1 for p in self._files() for _ in _lines(p))

    @property
    def pending(self) -> int:
        """Records spooled and not yet replayed."""
        return self._pending

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        payload = "".join(to_json(r) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(self._live, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._pending += len(records)

    def quarantine(self, record: Record, reason: str) -> None:
        """Keep a record the database refused (durably, with the reason), out of the replay."""
        line = json.dumps({"reason": reason, "record": json.loads(to_json(record))}, separators=(",", ":")) + "\n"
        with self._lock:
            fd = os.open(self.quarantine_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def quarantined(self) -> list[tuple[str, Record]]:
        """(the database's reason, the record) for every quarantined record, oldest first."""
        if not self.quarantine_path.exists():
            return []
        out = []
        for line in _lines(self.quarantine_path):
            entry = json.loads(line)
            out.append((str(entry["reason"]), from_json(json.dumps(entry["record"]))))
        return out

    def replay_files(self) -> list[Path]:
        """Freeze the live file into a replay file; all replay files, oldest first."""
        with self._lock:
            if self._live.exists() and self._live.stat().st_size > 0:
                self._live.rename(self.directory / f"spool-{time.time_ns()}.replay.jsonl")
        return sorted(self.directory.glob("spool-*.replay.jsonl"))

    def read(self, path: Path) -> Iterator[Record]:
        for line in _lines(path):
            yield from_json(line)

    def done(self, path: Path, count: int) -> None:
        """``path``'s ``count`` records are in the database."""
        path.unlink(missing_ok=True)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        with self._lock:
            self._pending = max(0, self._pending - count)

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("spool-*.replay.jsonl")) + ([self._live] if self._live.exists() else [])


def _drop_torn_tail(path: Path) -> None:
    """A crash mid-append leaves a last line without its newline: cut it, or the next append would corrupt it."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                yield line
