"""The SQL store on SQLite and on a real PostgreSQL: migrations, idempotent writes, thumbs, purge."""

from __future__ import annotations

import time

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway.store.migrate import current
from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from gateway.store.schema import metadata
from gateway.store.sql import SqlStore


def completion(i: int, created: float | None = None) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-{i}",
        created=created if created is not None else time.time(),
        key_id="team-a",
        messages=[{"role": "user", "content": f"What is {i} plus 1?"}],
        params={"temperature": 0.6, "max_tokens": 32},
        policy_version="base",
        rm_version="rm-base",
        n_candidates=2,
        prompt_tokens=7,
        completion_tokens=9,
        timings_ms={"generate": 12.5, "score": 3.0},
        candidates=[
            CandidateRecord(0, f"{i + 1}.", [5, 6], "stop", reward=1.5, logprob_sum=-0.5, logprob_mean=-0.25, chosen=True),
            CandidateRecord(1, "Ugh, café ☕", [7, 8, 9], "length", reward=-0.5, scores={"style": -1.0}),
        ],
    )


def test_migrations_build_exactly_the_schema_the_code_uses(sql_store: SqlStore) -> None:
    assert current(sql_store.engine) == "0002"
    sql_store.migrate()  # a second start migrates nothing
    with sql_store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_records_round_trip(sql_store: SqlStore) -> None:
    record = completion(1)
    record.candidates[1].token_ids, record.candidates[1].tokens = [], 3  # redacted: the ids dropped, the length kept
    sql_store.write([record])
    [back] = list(sql_store.read_completions())
    assert back == record
    assert back.candidates[1].token_count == 3


def test_writes_are_idempotent(sql_store: SqlStore) -> None:
    records = [completion(i) for i in range(5)]
    sql_store.write(records[:3])
    sql_store.write(records)  # a spool replay overlapping what was written
    sql_store.write(records[2:4])
    counts = sql_store.counts()
    assert (counts.completions, counts.candidates) == (5, 10)
    assert sorted(sql_store.completion_ids()) == sorted(r.id for r in records)


def test_a_repeated_thumb_replaces_and_an_older_one_never_wins(sql_store: SqlStore) -> None:
    now = time.time()
    sql_store.write([FeedbackRecord("chatcmpl-1", "team-a", "up", None, now)])  # before its completion: fine
    sql_store.write([FeedbackRecord("chatcmpl-1", "team-a", "down", "wrong", now + 1), completion(1)])
    sql_store.write([FeedbackRecord("chatcmpl-1", "team-a", "up", "replayed", now - 5)])
    sql_store.write(
        [FeedbackRecord("chatcmpl-2", "team-a", "up", None, now), FeedbackRecord("chatcmpl-2", "team-a", "down", None, now + 2)]
    )
    thumbs = sql_store.read_feedback()
    assert sql_store.counts().feedback == 2
    assert (thumbs["chatcmpl-1"].thumb, thumbs["chatcmpl-1"].comment) == ("down", "wrong")
    assert thumbs["chatcmpl-2"].thumb == "down"


def test_a_failed_batch_writes_nothing(sql_store: SqlStore) -> None:
    bad = completion(2)
    bad.candidates.append(CandidateRecord(5, None, [1], "stop"))  # type: ignore[arg-type]  # violates NOT NULL
    try:
        sql_store.write([completion(1), bad])
    except Exception:
        pass
    else:
        raise AssertionError("expected the batch to fail")
    assert sql_store.counts().completions == 0


def test_purge_deletes_old_records_only(sql_store: SqlStore) -> None:
    now = time.time()
    day = 86400.0
    sql_store.write(
        [completion(1, now - 10 * day), completion(2, now - day), FeedbackRecord("chatcmpl-1", "k", "up", None, now - 10 * day)]
    )
    purged = sql_store.purge(older_than_s=5 * day, now=now)
    assert (purged.completions, purged.candidates, purged.feedback) == (1, 2, 1)
    assert sql_store.completion_ids() == ["chatcmpl-2"]
    assert [r.id for r in sql_store.read_completions(since=now - 2 * day)] == ["chatcmpl-2"]


def test_reads_page_through_the_window_in_order_with_candidates_and_thumbs(sql_store: SqlStore) -> None:
    now = time.time()
    records = [completion(i, now + i // 2) for i in range(7)]  # pairs share a timestamp: pages must not skip ties
    sql_store.write([*records, completion(99, now + 100), FeedbackRecord("chatcmpl-3", "team-a", "down", None, now)])
    read = list(sql_store.read_labelled(since=now, until=now + 50, chunk=3))
    assert [r.id for r, _ in read] == [r.id for r in sorted(records, key=lambda r: (r.created, r.id))]
    assert all(r.candidates == records[int(r.id.split("-")[1])].candidates for r, _ in read)
    assert {r.id: t.thumb for r, t in read if t is not None} == {"chatcmpl-3": "down"}
    assert sql_store.read_feedback(["chatcmpl-4"]) == {}


def test_arm_totals_sum_the_chosen_answers_and_thumbs_per_version(sql_store: SqlStore) -> None:
    """The canary gate's input: only the chosen candidate counts, only the given reward model, only since ``since``."""
    records: list[CompletionRecord | FeedbackRecord] = []
    rows = [
        ("v1", "rm-base", 1.0, 100.0), ("v1", "rm-base", 3.0, 100.0), ("v2", "rm-base", -2.0, 100.0),
        ("v2", "rm-2", 9.0, 100.0), ("v1", "rm-base", 50.0, 10.0),
    ]  # fmt: skip
    for i, (version, rm, reward, created) in enumerate(rows):
        record = completion(i, created=created)
        record.policy_version, record.rm_version = version, rm
        record.candidates[0].reward = reward
        records.append(record)
    records += [
        FeedbackRecord("chatcmpl-0", "team-a", "up", None, 101.0),
        FeedbackRecord("chatcmpl-1", "team-a", "down", None, 101.0),
        FeedbackRecord("chatcmpl-2", "team-a", "down", None, 101.0),
        FeedbackRecord("chatcmpl-3", "team-a", "up", None, 101.0),  # another reward model's answer: not counted
    ]
    sql_store.write(records)
    totals = sql_store.arm_totals(["v1", "v2", "v3"], "rm-base", since=50.0)
    v1, v2, v3 = totals["v1"], totals["v2"], totals["v3"]
    assert (v1.n, v1.reward_sum, v1.reward_sq_sum, v1.length_sum, v1.thumbs_up, v1.thumbs_down) == (2, 4.0, 10.0, 4.0, 1, 1)
    assert (v2.n, v2.reward_sum, v2.thumbs_up, v2.thumbs_down) == (1, -2.0, 0, 1)
    assert v3.n == 0
