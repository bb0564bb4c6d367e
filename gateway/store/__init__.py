"""The durable log: records, the SQL store (SQLite or PostgreSQL), the spool and the write-behind writer."""

from gateway.store.logproc import ChildSettings, LogUnavailable, ProcessWriter
from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord, Record
from gateway.store.spool import Spool
from gateway.store.sql import SqlStore, Store
from gateway.store.writer import RecordWriter, WriterStats

LogWriter = RecordWriter | ProcessWriter
"""The writer a gateway logs through: a thread in its process, or a process of its own (``store.writer``)."""

__all__ = [
    "CandidateRecord", "ChildSettings", "CompletionRecord", "FeedbackRecord", "LogUnavailable", "LogWriter",
    "ProcessWriter", "Record", "RecordWriter", "Spool", "SqlStore", "Store", "WriterStats",
]  # fmt: skip
