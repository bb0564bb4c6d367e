"""Several processes writing one log at once (gateway workers or replicas, a purge, the
trainer's export reading): on SQLite (WAL, busy timeout) and on PostgreSQL, every write
succeeds ("database is locked" is a failure here, not a retry) and nothing is lost."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from gateway.store.sql import SqlStore

WRITERS = 4
BATCHES = 60
PER_BATCH = 4
SHARED = "chatcmpl-shared"
"""One completion every writer thumbs in every batch: the writers contend for the same row."""


def record(writer: int, batch: int, i: int) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-{writer}-{batch}-{i}", created=time.time(), key_id=f"key-{writer}",
        messages=[{"role": "user", "content": f"What is {batch} plus {i}?"}], params={"max_tokens": 8},
        policy_version="base", rm_version="rm", n_candidates=2, prompt_tokens=7, completion_tokens=4, timings_ms={},
        candidates=[CandidateRecord(k, f"{batch + i + k}.", [5, 6], "stop", reward=float(k), chosen=k == 1) for k in range(2)],
    )  # fmt: skip


def write_many(url: str, writer: int) -> int:
    """One process's writes, each batch one transaction like the gateway's writer; the batches written."""
    store = SqlStore(url)
    try:
        for batch in range(BATCHES):
            records = [record(writer, batch, i) for i in range(PER_BATCH)]
            thumbs = [FeedbackRecord(r.id, r.key_id, "up", None, time.time()) for r in records[:2]]
            store.write([*records, *thumbs, FeedbackRecord(SHARED, f"key-{writer}", "down", None, time.time())])
        return BATCHES
    finally:
        store.close()


def test_concurrent_writers_and_a_reader_lose_nothing(sql_store: SqlStore) -> None:
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as separate gateway processes would be
    started = time.perf_counter()
    with ProcessPoolExecutor(WRITERS, mp_context=spawn) as pool:
        futures = [pool.submit(write_many, sql_store.url, w) for w in range(WRITERS)]
        reads = 0
        while not all(f.done() for f in futures):  # the export's reads and a purge run alongside
            sql_store.counts()
            sql_store.purge(older_than_s=3600)
            reads += 1
        written = [f.result() for f in futures]  # re-raises a writer's "database is locked"
    elapsed = time.perf_counter() - started
    counts = sql_store.counts()
    total = WRITERS * BATCHES * PER_BATCH
    print(
        f"\n{sql_store.engine.dialect.name}: {WRITERS} writer processes x {BATCHES} transactions "
        f"alongside {reads} read+purge rounds in {elapsed:.1f} s: {counts.completions} of {total} completions, no error"
    )
    assert written == [BATCHES] * WRITERS
    assert (counts.completions, counts.candidates) == (total, 2 * total)
    assert counts.feedback == WRITERS * BATCHES * 2 + 1  # the shared row once, whoever wrote last
