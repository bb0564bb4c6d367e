"""The durable log: records, the SQL store (SQLite or PostgreSQL), the spool and the write-behind writer."""

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord, Record
from gateway.store.spool import Spool
from gateway.store.sql import SqlStore, Store
from gateway.store.writer import RecordWriter, WriterStats

__all__ = [
    "CandidateRecord", "CompletionRecord", "FeedbackRecord", "Record",
    "RecordWriter", "Spool", "SqlStore", "Store", "WriterStats",
]  # fmt: skip
