"""The log writer in its own process (``store.writer: process``): the serving interpreter only hands records over.

With the writer thread (``gateway.store.writer``) SQLAlchemy's and SQLite's Python-level work competes with the event
loop for one interpreter; here a child process runs that same ``RecordWriter`` (its queue, spool, retries and
quarantine unchanged) and the gateway keeps two threads: a sender that pickles whatever records are waiting onto a
pipe in one message, and a receiver that takes the child's acknowledgements and its counters (records written,
spooled, refused; queue and spool depth) for the metrics. ``submit`` never blocks: a record waits in memory until the
sender passes it on. If the child dies, a new one is started (it replays the spool first) and the records not yet
passed on go to it; what the dead child had taken but not written is lost, as a SIGKILL loses the writer thread's
queue. The parent never writes the spool itself, so the spool keeps one writer. ``persist`` (a thumb, whose 200 means
it is kept) waits for the child's acknowledgement that the record is in the database or fsync'd in the spool; when
none comes in ``persist_timeout_s`` it raises, so the thumb is refused, never silently lost. The child ignores SIGINT
and SIGTERM: it stops when the gateway closes the pipe, after flushing. Reads (the inspector, the canary's totals,
the purge) use the parent's own ``store``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.store.records import Record
from gateway.store.sql import Store
from gateway.store.writer import WriterStats

log = logging.getLogger("gateway.store")
STATS_EVERY_S = 0.25


class LogUnavailable(Exception):
    """The writer process did not acknowledge a record that must be kept (it is not accepted)."""


@dataclass(frozen=True)
class ChildSettings:
    """What the child needs to build its ``RecordWriter`` (picklable)."""

    database_url: str
    connect_timeout_s: float
    spool_dir: Path
    queue_size: int
    batch_size: int
    flush_interval_s: float
    retry_s: float


class _SpoolView:
    """The child spool's depth as the parent last heard it (what ``Metrics.watch_log`` reads)."""

    pending = 0


class ProcessWriter:
    def __init__(
        self, store: Store, settings: ChildSettings, stats: WriterStats | None = None, persist_timeout_s: float = 10.0
    ) -> None:
        self.store = store
        self.spool = _SpoolView()
        self.settings = settings
        self.stats = stats or WriterStats()
        self.persist_timeout_s = persist_timeout_s
        self.restarts = 0
        self._queued: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._child_queue_depth = 0
        self._acks: dict[int, threading.Event] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()  # one sender on the pipe at a time (the sender thread, persist)
        self._conn: Connection | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        self._sender = threading.Thread(target=self._send_loop, name="log-sender", daemon=True)

    # ---- event-loop side ----
    def submit(self, record: Record) -> None:
        """Hand a record over; never blocks."""
        self._queued.put(record)

    def persist(self, record: Record) -> None:
        """Blocking (a worker thread): returns once the child has the record in the database or its spool."""
        token = next(self._tokens)
        done = threading.Event()
        self._acks[token] = done
        try:
            with self._lock:
                try:
                    self._send(("persist", token, record))
                except OSError:  # the child died as it was sent: the new one takes it
                    try:
                        self._send(("persist", token, record))
                    except OSError as exc:
                        raise LogUnavailable(f"the log writer process is not answering: {exc}") from exc
            if not done.wait(self.persist_timeout_s):
                raise LogUnavailable(f"the log writer process did not keep a record within {self.persist_timeout_s:g} s")
        finally:
            self._acks.pop(token, None)

    @property
    def queue_depth(self) -> int:
        return self._queued.qsize() + self._child_queue_depth

    def start(self) -> None:
        self._spawn()
        self._sender.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Pass on everything submitted, let the child flush it (database or spool) and exit."""
        self._queued.put(None)
        self._sender.join(timeout_s)
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(("close",))
        if self._child is not None:
            self._child.join(timeout_s)
            if self._child.is_alive():
                log.error("the log writer process did not stop in %.0f s; killing it", timeout_s)
                self._child.kill()
                self._child.join(5)

    # ---- sender thread ----
    def _send_loop(self) -> None:
        while True:
            first = self._queued.get()
            batch = [first] if first is not None else []
            while True:  # everything waiting, in one message
                try:
                    item = self._queued.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    first = None
                    break
                batch.append(item)
            while batch:
                with self._lock:
                    try:
                        self._send(("records", batch))
                        batch = []
                    except OSError:  # the child died: a new one gets the batch
                        pass
                if batch:
                    time.sleep(0.05)
            if first is None:
                return

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send on the pipe (the lock held), starting a new child first if the last one died."""
        if self._child is None or not self._child.is_alive() or self._conn is None:
            self._respawn()
        assert self._conn is not None
        try:
            self._conn.send(message)
        except OSError:
            self._respawn()
            raise

    def _respawn(self) -> None:
        if self._child is not None:
            self._child.join(1)
            log.error("the log writer process exited (code %s); starting a new one", self._child.exitcode)
            self.restarts += 1
        self._spawn()

    def _spawn(self) -> None:
        parent, child = multiprocessing.get_context("spawn").Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=_child_main, args=(child, self.settings), name="bon-log-writer", daemon=False
        )
        process.start()
        child.close()
        self._conn, self._child = parent, process
        threading.Thread(target=self._receive_loop, args=(parent,), name="log-receiver", daemon=True).start()

    # ---- receiver thread (one per child) ----
    def _receive_loop(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "ack":
                event = self._acks.get(message[1])
                if event is not None:
                    event.set()
            elif message[0] == "stats":
                self._apply(message[1])

    def _apply(self, counts: dict[str, Any]) -> None:
        self._child_queue_depth = counts["queue_depth"]
        self.spool.pending = counts["spool_pending"]
        if counts["logged"]:
            self.stats.logged(counts["logged"])
        if counts["spooled"]:
            self.stats.spooled(counts["spooled"])
        if counts["quarantined"]:
            self.stats.quarantined(counts["quarantined"])
        for kind, n in counts["write_errors"].items():
            for _ in range(n):
                self.stats.write_error(kind)


# ---- the child process ----
def _child_main(conn: Connection, settings: ChildSettings) -> None:  # pragma: no cover - runs in the child
    from gateway.store.spool import Spool
    from gateway.store.sql import SqlStore
    from gateway.store.writer import RecordWriter

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway stops it by closing the pipe, after a flush
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    counts: dict[str, Any] = {"logged": 0, "spooled": 0, "quarantined": 0, "write_errors": {}}
    counts_lock = threading.Lock()
    send_lock = threading.Lock()

    def add(key: str, n: int) -> None:
        with counts_lock:
            counts[key] += n

    def error(kind: str) -> None:
        with counts_lock:
            counts["write_errors"][kind] = counts["write_errors"].get(kind, 0) + 1

    stats = WriterStats(
        logged=lambda n: add("logged", n), spooled=lambda n: add("spooled", n),
        quarantined=lambda n: add("quarantined", n), write_error=error,
    )  # fmt: skip
    store = SqlStore(settings.database_url, connect_timeout_s=settings.connect_timeout_s)
    writer = RecordWriter(
        store, Spool(settings.spool_dir), queue_size=settings.queue_size, batch_size=settings.batch_size,
        flush_interval_s=settings.flush_interval_s, retry_s=settings.retry_s, stats=stats,
    )  # fmt: skip
    writer.start()
    stop = threading.Event()

    def report() -> None:
        with counts_lock:
            delta = dict(counts, write_errors=dict(counts["write_errors"]))
            counts.update(logged=0, spooled=0, quarantined=0, write_errors={})
        delta |= {"queue_depth": writer.queue_depth, "spool_pending": writer.spool.pending}
        with send_lock:
            conn.send(("stats", delta))

    def reporter() -> None:
        while not stop.wait(STATS_EVERY_S):
            try:
                report()
            except OSError:
                return

    threading.Thread(target=reporter, name="log-stats", daemon=True).start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the gateway is gone (or closed the pipe): flush and exit
            if message[0] == "records":
                for record in message[1]:
                    writer.submit(record)
            elif message[0] == "persist":
                writer.persist(message[2])
                with send_lock:
                    conn.send(("ack", message[1]))
            elif message[0] == "close":
                break
    finally:
        stop.set()
        writer.close()
        with contextlib.suppress(OSError):
            report()
        store.close()
        conn.close()
