"""The write-behind writer on a real SQLite file: batching, database outages, a full queue,
shutdown, and the spool's crash safety. Nothing submitted is lost or duplicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.store.records import CompletionRecord, FeedbackRecord, Record
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

    def ping(self) -> bool:
        return not self.down and self.store.ping()

    def refused(self, exc: Exception) -> bool:
        return self.store.refused(exc)

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


def poisoned(i: int) -> CompletionRecord:
    """A record neither database takes: a NUL (PostgreSQL's text and JSON refuse it) and a lone surrogate in a text
    column (not UTF-8: SQLite's driver refuses it; in a JSON column it would be written escaped)."""
    record = completion(i)
    record.messages = [{"role": "user", "content": "What is 1\x00 plus 1?"}]
    record.candidates[0].text = "2\x00\ud800"
    return record


def test_one_poisoned_record_is_quarantined_and_the_rest_are_written(sql_store: SqlStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantined: list[int] = []
    writer = RecordWriter(sql_store, spool, flush_interval_s=0.05)
    writer.stats.quarantined = quarantined.append
    writer.start()
    for record in (completion(1), poisoned(2), completion(3), FeedbackRecord("chatcmpl-1", "team-a", "up", "ok\x00", 1.0)):
        writer.submit(record)
    wait_until(lambda: sql_store.counts().completions == 2, message="the good records of the batch were not written")
    writer.submit(completion(4))  # the log is not wedged
    wait_until(lambda: sql_store.counts().completions == 3, message="the log stopped after a poisoned record")
    writer.close()
    assert sorted(sql_store.completion_ids()) == ["chatcmpl-1", "chatcmpl-3", "chatcmpl-4"]
    assert spool.pending == 0
    refused = [record for _, record in spool.quarantined()]
    assert [r.id for r in refused if isinstance(r, CompletionRecord)] == ["chatcmpl-2"]
    first = refused[0]
    assert isinstance(first, CompletionRecord)
    assert (first.messages, first.candidates[0].text) == (poisoned(2).messages, "2\x00\ud800")  # kept whole, for a person
    assert sum(quarantined) == len(refused)
    if sql_store.engine.dialect.name == "postgresql":  # SQLite takes a NUL in text: only PostgreSQL refuses the thumb
        assert (len(refused), sql_store.counts().feedback) == (2, 0)
    else:
        assert (len(refused), sql_store.counts().feedback) == (1, 1)


def test_a_poisoned_record_in_the_spool_does_not_stop_the_replay(sql_store: SqlStore, tmp_path: Path) -> None:
    db = Switchable(sql_store)
    db.down = True
    writer = RecordWriter(db, Spool(tmp_path / "spool"), flush_interval_s=0.01, retry_s=0.05)
    writer.start()
    for record in (completion(1), poisoned(2), completion(3)):
        writer.submit(record)
    wait_until(lambda: writer.spool.pending == 3, message="the records were not spooled")
    db.down = False
    wait_until(lambda: writer.spool.pending == 0, message="the replay stopped at the poisoned record")
    writer.close()
    assert sorted(sql_store.completion_ids()) == ["chatcmpl-1", "chatcmpl-3"]
    assert [r.id for _, r in writer.spool.quarantined() if isinstance(r, CompletionRecord)] == ["chatcmpl-2"]


def test_a_database_that_answers_but_refuses_every_write_spools_and_quarantines_nothing(tmp_path: Path) -> None:
    """Read-only (a replica after a failover, a full disk): ``SELECT 1`` works, every write fails; not the records' fault."""
    sqlite(tmp_path).close()  # the schema, then the same file opened read-only
    readonly = SqlStore(f"sqlite:///file:{tmp_path / 'log.db'}?mode=ro&uri=true")
    assert readonly.ping()
    writer = RecordWriter(readonly, Spool(tmp_path / "spool"), flush_interval_s=0.01, retry_s=60)
    writer.start()
    for record in (completion(1), poisoned(2)):
        writer.submit(record)
    writer.close()
    assert writer.spool.pending == 2
    assert writer.spool.quarantined() == []
