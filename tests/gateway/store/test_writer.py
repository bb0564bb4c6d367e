"""The write-behind writer on a real SQLite file: batching, database outages, a full queue,
shutdown, and the spool's crash safety. Nothing submitted is lost or duplicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.store.records import FeedbackRecord, Record
from gateway.store.spool import Spool
from gateway.store.sql import SqlStore
from gateway.store.writer import RecordWriter
from tests.gateway.store.test_sql import completion
from tests.polling import wait_until


class Switchable:
    """A real store that can be switched off (writes raise) or slowed down."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def write(self, records: Sequence[Record]) -> None:
        self.gate.wait()
        if self.down:
            raise ConnectionError("database unreachable")
        self.store.write(records)

    def close(self) -> None:
        self.store.close()


def sqlite(tmp_path: Path) -> SqlStore:
    store = SqlStore(f"sqlite:///{tmp_path / 'log.db'}")
    store.migrate()
    return store


def test_records_are_written_in_batches(tmp_path: Path) -> None:
    store = sqlite(tmp_path)
    writer = RecordWriter(store, Spool(tmp_path / "spool"), batch_size=50, flush_interval_s=0.01)
    writer.start()
    for i in range(200):
        writer.submit(completion(i))
    writer.close()
    assert store.counts().completions == 200


def test_an_outage_spools_then_replays_everything_once(tmp_path: Path) -> None:
    db = Switchable(sqlite(tmp_path))
    spooled: list[int] = []
    writer = RecordWriter(db, Spool(tmp_path / "spool"), flush_interval_s=0.01, retry_s=0.05)
    writer.stats.spooled = spooled.append
    writer.start()
    for i in range(30):
        writer.submit(completion(i))
    wait_until(lambda: db.store.counts().completions == 30)
    db.down = True
    for i in range(30, 80):
        writer.submit(completion(i))
        writer.submit(FeedbackRecord(f"chatcmpl-{i}", "team-a", "up", None, time.time()))
    wait_until(lambda: sum(spooled) == 100)
    db.down = False
    wait_until(lambda: db.store.counts().completions == 80 and writer.spool.pending == 0)
    writer.close()
    counts = db.store.counts()
    assert (counts.completions, counts.candidates, counts.feedback) == (80, 160, 50)
    assert sorted(db.store.completion_ids()) == sorted(f"chatcmpl-{i}" for i in range(80))
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


def test_a_full_queue_overflows_to_the_spool_without_blocking(tmp_path: Path) -> None:
    db = Switchable(sqlite(tmp_path))
    db.gate.clear()  # the database hangs: the writer thread is stuck in a write
    writer = RecordWriter(db, Spool(tmp_path / "spool"), queue_size=10, batch_size=5, flush_interval_s=0.01)
    writer.start()

    # submit never waits for the database: with the database hung, a submit that waited would never return
    def submit_all() -> None:
        for i in range(100):
            writer.submit(completion(i))

    submitting = threading.Thread(target=submit_all, daemon=True)
    submitting.start()
    submitting.join(60)
    assert not submitting.is_alive(), "submit is blocked behind the hung database"
    wait_until(lambda: writer.spool.pending >= 80)
    db.gate.set()
    wait_until(lambda: db.store.counts().completions == 100)
    writer.close()
    assert sorted(db.store.completion_ids()) == sorted(f"chatcmpl-{i}" for i in range(100))


def test_shutdown_with_the_database_down_keeps_records_for_the_next_start(tmp_path: Path) -> None:
    db = Switchable(sqlite(tmp_path))
    db.down = True
    writer = RecordWriter(db, Spool(tmp_path / "spool"), flush_interval_s=0.01, retry_s=60)
    writer.start()
    for i in range(20):
        writer.submit(completion(i))
    writer.close()
    assert db.store.counts().completions == 0
    db.down = False
    again = RecordWriter(db, Spool(tmp_path / "spool"), flush_interval_s=0.01)
    assert again.spool.pending == 20
    again.start()  # replays at start
    wait_until(lambda: db.store.counts().completions == 20)
    again.close()


def test_a_torn_spool_line_from_a_crash_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append([completion(1), completion(2)])
    with open(tmp_path / "spool" / "spool.jsonl", "a") as f:
        f.write('{"kind": "completion", "id": "chatcmpl-torn", ')  # the process died mid-write
    reopened = Spool(tmp_path / "spool")
    reopened.append([completion(3)])
    [path] = reopened.replay_files()
    assert [r.id for r in reopened.read(path) if not isinstance(r, FeedbackRecord)] == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]
