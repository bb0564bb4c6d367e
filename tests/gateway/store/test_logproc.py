"""The log writer in its own process (``store.writer: process``): records reach the database through the child, a
thumb is acknowledged only once kept, a killed child is replaced and the records after it still land, a child that
does not answer makes ``persist`` refuse (not lose) the thumb, and the child's counters reach the parent's metrics."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gateway.store.logproc import ChildSettings, LogUnavailable, ProcessWriter
from gateway.store.records import FeedbackRecord
from gateway.store.sql import SqlStore
from gateway.store.writer import WriterStats
from tests.gateway.store.test_sql import completion
from tests.polling import wait_until


def _writer(tmp_path: Path, logged: list[int] | None = None, timeout_s: float = 10.0) -> tuple[ProcessWriter, SqlStore]:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = SqlStore(url)
    store.migrate()
    child = ChildSettings(url, 3.0, tmp_path / "spool", 10_000, 256, 0.01, 0.5)
    stats = WriterStats(logged=logged.append) if logged is not None else None
    writer = ProcessWriter(store, child, stats, persist_timeout_s=timeout_s)
    writer.start()
    return writer, store


def _pid(writer: ProcessWriter) -> int:
    assert writer._child is not None
    assert writer._child.pid is not None
    return writer._child.pid


def test_records_reach_the_database_through_the_child_and_close_flushes(tmp_path: Path) -> None:
    logged: list[int] = []
    writer, store = _writer(tmp_path, logged)
    for i in range(300):
        writer.submit(completion(i))
    writer.persist(FeedbackRecord("chatcmpl-7", "team-a", "up", None, time.time()))
    assert store.read_feedback(["chatcmpl-7"])["chatcmpl-7"].thumb == "up"  # kept before persist returned
    writer.close()
    assert store.counts().completions == 300
    assert sum(logged) == 301  # the child's counters reached the parent (the last ones at close)
    assert writer.restarts == 0
    store.close()


def test_a_killed_child_is_replaced_and_later_records_still_land(tmp_path: Path) -> None:
    writer, store = _writer(tmp_path)
    writer.submit(completion(0))
    wait_until(lambda: store.counts().completions == 1, 30, "the first record")
    os.kill(_pid(writer), signal.SIGKILL)
    wait_until(lambda: writer._child is not None and not writer._child.is_alive(), 30, "the child dead")
    for i in range(1, 101):
        writer.submit(completion(i))
    writer.persist(FeedbackRecord("chatcmpl-5", "team-a", "down", None, time.time()))
    writer.close()
    assert writer.restarts == 1
    assert store.counts().completions == 101
    assert store.read_feedback(["chatcmpl-5"])["chatcmpl-5"].thumb == "down"
    store.close()


def test_a_child_that_does_not_answer_makes_persist_refuse_the_thumb(tmp_path: Path) -> None:
    writer, store = _writer(tmp_path)
    writer.persist(FeedbackRecord("chatcmpl-1", "team-a", "up", None, time.time()))  # started and answering
    writer.persist_timeout_s = 0.5
    pid = _pid(writer)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(LogUnavailable, match="did not keep a record"):
            writer.persist(FeedbackRecord("chatcmpl-2", "team-a", "up", None, time.time()))
    finally:
        os.kill(pid, signal.SIGCONT)
    writer.close()
    assert writer.restarts == 0
    assert set(store.read_feedback()) >= {"chatcmpl-1"}  # the refused one may land later: writes are idempotent
    store.close()
