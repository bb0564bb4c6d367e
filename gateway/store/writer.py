"""Write-behind for the log: responses never wait for the database, and no record is lost.

``submit`` is called on the event loop and never blocks: a record goes into a bounded
queue; a writer thread takes batches from it and writes each in one transaction. When
the queue is full, records overflow to a spool thread that appends them to the spool
(fsync'd JSONL). When a write fails (database down or unreachable), the batch goes to the
spool and the database is left alone for ``retry_s``; then the spool is replayed into it,
oldest first. ``close`` drains the queue and the overflow (into the database, or the
spool when the database is down); a spool left on disk is replayed at the next start.
``persist`` is the durable path for a record whose 200 must mean it is kept (a thumb): it
is in the database or fsync'd in the spool before the call returns. A SIGKILL loses only
the queued completions not yet written (at most ``flush_interval_s`` of traffic plus the
batch in flight).
A batch the database refuses for its content while it still answers holds a record it
cannot take (a NUL character, a lone surrogate, a violated constraint): the batch is written
record by record and the refused ones are quarantined (``Spool.quarantine``), so one bad
record never wedges the log. Any other failure (down, read-only, full, a deadlock) spools
the records for a later replay, never quarantines them.

Threads rather than asyncio: SQLAlchemy's engine and fsync are blocking, and the writer
must keep working while the event loop is busy serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.store.records import CompletionRecord, Record
from gateway.store.spool import Spool
from gateway.store.sql import Store

log = logging.getLogger("gateway.store")


@dataclass
class WriterStats:
    """Callbacks for metrics (the gateway wires Prometheus counters in)."""

    logged: Callable[[int], None] = lambda n: None
    spooled: Callable[[int], None] = lambda n: None
    write_error: Callable[[str], None] = lambda kind: None
    quarantined: Callable[[int], None] = lambda n: None


class RecordWriter:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        flush_interval_s: float = 0.05,
        retry_s: float = 2.0,
        stats: WriterStats | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_s = retry_s
        self.stats = stats or WriterStats()
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        self._overflow: queue.SimpleQueue[Record] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._db_down_until = 0.0
        self._threads = [
            threading.Thread(target=self._write_loop, name="log-writer", daemon=True),
            threading.Thread(target=self._overflow_loop, name="log-spool", daemon=True),
        ]

    # ---- event-loop side ----
    def submit(self, record: Record) -> None:
        """Hand a record over; never blocks, never drops."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._overflow.put(record)

    def persist(self, record: Record) -> None:
        """Write one record before returning: into the database, else (down, or refusing it) to disk.

        Blocking (call it from a worker thread). For what a client's 200 promises is already
        kept, whatever happens to this process next: a thumb. Not for the completions, which
        ride the queue so that responses never wait for the database."""
        if self.db_up and not self._store([record]):
            return  # written, or quarantined (durably) for its content
        self._to_spool([record])

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def db_up(self) -> bool:
        return time.monotonic() >= self._db_down_until

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush everything submitted so far (to the database, or the spool), then stop."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        # whatever a stuck thread left behind still reaches the disk
        rest = _drain(self._queue) + _drain(self._overflow)
        if rest:
            self._to_spool(rest)

    # ---- writer thread ----
    def _write_loop(self) -> None:
        self._replay()
        while True:
            batch = self._next_batch()
            if batch:
                self._write(batch)
            if self.spool.pending and self.db_up:
                self._replay()
            if self._stop.is_set() and self._queue.empty():
                return

    def _next_batch(self) -> list[Record]:
        """Up to ``batch_size`` records; after the first, wait ``flush_interval_s`` for more (unless closing).

        Lingering makes one transaction per interval instead of one per record at low rates,
        and keeps the write from landing while the response that submitted it is being sent.
        """
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        if self._queue.qsize() < self.batch_size - 1:
            self._stop.wait(self.flush_interval_s)
        return [first, *_drain(self._queue, self.batch_size - 1)]

    def _write(self, batch: list[Record]) -> None:
        if not self.db_up:
            self._to_spool(batch)
            return
        unwritten = self._store(batch)
        if unwritten:
            self._to_spool(unwritten)

    def _store(self, records: list[Record]) -> list[Record]:
        """Write ``records``; what is left when the database is down (to be spooled), else [].

        A batch the database refuses while it answers is written record by record, and a
        record it still refuses is quarantined."""
        try:
            self.store.write(records)
        except Exception as exc:
            if not self._refused(exc):
                self._db_failed(exc)
                return records
        else:
            self.stats.logged(len(records))
            return []
        for i, record in enumerate(records):
            try:
                self.store.write([record])
            except Exception as exc:
                if not self._refused(exc):
                    self._db_failed(exc)
                    return records[i:]
                self._quarantine(record, exc)
            else:
                self.stats.logged(1)
        return []

    def _refused(self, exc: Exception) -> bool:
        """The records' fault (their content), and the database answers: not a reason to spool and retry."""
        return self.store.refused(exc) and self.store.ping()

    def _quarantine(self, record: Record, exc: Exception) -> None:
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.spool.quarantine(record, reason)
        self.stats.quarantined(1)
        self.stats.write_error(exc.__class__.__name__)
        name = record.id if isinstance(record, CompletionRecord) else f"thumb on {record.completion_id}"
        log.error("the log database refused record %s (%s); quarantined in %s", name, reason, self.spool.quarantine_path)

    def _replay(self) -> None:
        """Move spooled records into the database, oldest file first; stop at the first failure."""
        try:
            files = self.spool.replay_files()
        except OSError as exc:
            log.error("spool unreadable: %s", exc)
            return
        for path in files:
            records = list(self.spool.read(path))
            for i in range(0, len(records), self.batch_size):
                if self._store(records[i : i + self.batch_size]):
                    return  # the database is down: the file stays (writes are idempotent, a second replay is harmless)
            self.spool.done(path, len(records))
            log.info("replayed %d spooled records from %s", len(records), path.name)

    def _db_failed(self, exc: Exception) -> None:
        self.stats.write_error(exc.__class__.__name__)
        if self.db_up:
            log.warning("log database write failed (%s: %s); spooling for %.1f s", exc.__class__.__name__, exc, self.retry_s)
        self._db_down_until = time.monotonic() + self.retry_s

    # ---- spool thread (overflow) ----
    def _overflow_loop(self) -> None:
        while not (self._stop.is_set() and self._overflow.empty()):
            try:
                first = self._overflow.get(timeout=0.1)
            except queue.Empty:
                continue
            self._to_spool([first, *_drain(self._overflow, self.batch_size - 1)])

    def _to_spool(self, batch: list[Record]) -> None:
        self.spool.append(batch)
        self.stats.spooled(len(batch))


def _drain(q: queue.Queue[Record] | queue.SimpleQueue[Record], limit: int | None = None) -> list[Record]:
    """Take what is already in ``q`` (at most ``limit``), without waiting."""
    out: list[Record] = []
    while limit is None or len(out) < limit:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            break
    return out
