"""The log store on a SQL database through SQLAlchemy 2: SQLite (default) or PostgreSQL.

Knows how to open the database (SQLite in WAL mode; PostgreSQL through psycopg 3 with a
connection pool), bring its schema to the newest migration, write a batch of records in
one transaction, idempotently (a record replayed from the spool, or written twice, is kept
once; a repeated thumb replaces the previous one), read what the trainer exports, and
purge old records. Synchronous: the writer's threads call it (and a worker thread for a thumb), never
the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine, delete, event, func, literal, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError, StatementError

from gateway.gate import ArmTotals
from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord, Record
from gateway.store.schema import candidates, completions, feedback


class Store(Protocol):
    """Where records end up. Implementations are synchronous and thread-safe."""

    def write(self, records: Sequence[Record]) -> None:
        """All of ``records`` in one transaction, or an exception and none of them."""
        ...

    def ping(self) -> bool:
        """Whether the database answers; never raises."""
        ...

    def refused(self, exc: Exception) -> bool:
        """Whether a failed write's error is about the records' content (a character, a constraint), not about the
        database's state (down, read-only, full, a deadlock): only such records are ever quarantined."""
        ...

    def close(self) -> None: ...


@dataclass
class VersionFigures:
    """What the inspector shows per policy version (``SqlStore.version_figures``)."""

    answers: int
    mean_reward: float | None
    mean_length: float | None
    thumbs_up: int
    thumbs_down: int


@dataclass
class Counts:
    completions: int
    candidates: int
    feedback: int


class SqlStore:
    def __init__(self, url: str, *, connect_timeout_s: float = 3.0, busy_timeout_s: float = 10.0, echo: bool = False) -> None:
        """``busy_timeout_s`` (SQLite): how long a write waits for another process's write lock (gateway workers,
        a purge, a second gateway on one file) before "database is locked" sends its batch to the spool."""
        self.url = url
        self.engine = _engine(url, connect_timeout_s, busy_timeout_s, echo)
        self._dialect = self.engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self._dialect!r}: use sqlite:/// or postgresql+psycopg://")

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic migration (idempotent; serialised across replicas)."""
        from gateway.store.migrate import upgrade

        upgrade(self.engine)

    def write(self, records: Sequence[Record]) -> None:
        done = [r for r in records if isinstance(r, CompletionRecord)]
        thumbs = _latest_thumbs([r for r in records if isinstance(r, FeedbackRecord)])
        with self.engine.begin() as conn:
            if done:
                self._insert_ignore(conn, completions, [_completion_row(r) for r in done], ["id"])
                rows = [_candidate_row(r.id, c) for r in done for c in r.candidates]
                if rows:
                    self._insert_ignore(conn, candidates, rows, ["completion_id", "idx"])
            if thumbs:
                self._upsert_feedback(conn, thumbs)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # whatever the driver raises, the answer is "no"
            return False
        return True

    def refused(self, exc: Exception) -> bool:
        orig = exc.orig if isinstance(exc, StatementError) else None
        return isinstance(exc, DataError | IntegrityError | UnicodeError) or isinstance(orig, UnicodeError | ValueError)

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    def _insert_ignore(self, conn: Connection, table: Any, rows: list[dict[str, Any]], keys: list[str]) -> None:
        conn.execute(self._insert(table).on_conflict_do_nothing(index_elements=keys), rows)

    def _upsert_feedback(self, conn: Connection, rows: list[FeedbackRecord]) -> None:
        stmt = self._insert(feedback)
        stmt = stmt.on_conflict_do_update(
            index_elements=["completion_id"],
            set_={"thumb": stmt.excluded.thumb, "comment": stmt.excluded.comment, "created": stmt.excluded.created},
            where=feedback.c.created <= stmt.excluded.created,  # a replayed older thumb never wins
        )
        conn.execute(stmt, [_feedback_row(r) for r in rows])

    # ---- reading ----
    def counts(self) -> Counts:
        with self.engine.connect() as conn:
            return Counts(
                *(conn.execute(select(func.count()).select_from(t)).scalar_one() for t in (completions, candidates, feedback))
            )

    def completion_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(completions.c.id)).scalars())

    def read_completions(self, since: float = 0.0, until: float | None = None, *, chunk: int = 500) -> Iterator[CompletionRecord]:
        """Completions created in ``[since, until)`` with their candidates, oldest first."""
        for batch in self._completion_chunks(since, until, chunk):
            yield from batch

    def read_labelled(
        self, since: float = 0.0, until: float | None = None, *, chunk: int = 500
    ) -> Iterator[tuple[CompletionRecord, FeedbackRecord | None]]:
        """Like ``read_completions``, each with its owner's latest thumb (or None)."""
        for batch in self._completion_chunks(since, until, chunk):
            thumbs = self.read_feedback([r.id for r in batch])
            for record in batch:
                yield record, thumbs.get(record.id)

    def _completion_chunks(self, since: float, until: float | None, chunk: int) -> Iterator[list[CompletionRecord]]:
        """Keyset pages of ``chunk`` completions, each with one query for all their candidates."""
        after: tuple[float, str] | None = None
        while True:
            query = select(completions).where(completions.c.created >= since)
            if until is not None:
                query = query.where(completions.c.created < until)
            if after is not None:
                key = tuple_(completions.c.created, completions.c.id)
                query = query.where(key > tuple_(literal(after[0]), literal(after[1])))
            query = query.order_by(completions.c.created, completions.c.id).limit(chunk)
            with self.engine.connect() as conn:
                rows = list(conn.execute(query).mappings())
                if not rows:
                    return
                ids = [row["id"] for row in rows]
                found: dict[str, list[CandidateRecord]] = {i: [] for i in ids}
                cands = select(candidates).where(candidates.c.completion_id.in_(ids))
                for c in conn.execute(cands.order_by(candidates.c.completion_id, candidates.c.idx)).mappings():
                    found[c["completion_id"]].append(_candidate_record(c))
            yield [_completion_record(row, found[row["id"]]) for row in rows]
            after = (rows[-1]["created"], rows[-1]["id"])

    def recent(
        self, limit: int = 50, *, policy_version: str | None = None, status: str | None = None, before: float | None = None
    ) -> list[CompletionRecord]:
        """The newest completions (created before ``before``, when given), with their candidates, newest first."""
        query = select(completions)
        if policy_version is not None:
            query = query.where(completions.c.policy_version == policy_version)
        if status is not None:
            query = query.where(completions.c.status == status)
        if before is not None:
            query = query.where(completions.c.created < before)
        query = query.order_by(completions.c.created.desc(), completions.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
            found: dict[str, list[CandidateRecord]] = {row["id"]: [] for row in rows}
            cands = select(candidates).where(candidates.c.completion_id.in_(list(found)))
            for c in conn.execute(cands.order_by(candidates.c.completion_id, candidates.c.idx)).mappings():
                found[c["completion_id"]].append(_candidate_record(c))
        return [_completion_record(row, found[row["id"]]) for row in rows]

    def version_figures(self) -> dict[str, VersionFigures]:
        """Per policy version over everything logged: answers, the chosen answers' mean reward (scored ones) and
        length, and the thumbs. Two aggregate queries."""
        chosen = (
            select(
                completions.c.policy_version, func.count(), func.count(candidates.c.reward), func.sum(candidates.c.reward),
                func.sum(candidates.c.token_count),
            )
            .join(candidates, candidates.c.completion_id == completions.c.id)
            .where(candidates.c.chosen, completions.c.status == "ok")
            .group_by(completions.c.policy_version)
        )  # fmt: skip
        thumbs = (
            select(completions.c.policy_version, feedback.c.thumb, func.count())
            .join(feedback, feedback.c.completion_id == completions.c.id)
            .group_by(completions.c.policy_version, feedback.c.thumb)
        )
        with self.engine.connect() as conn:
            sums = {row[0]: row[1:] for row in conn.execute(chosen)}
            votes: dict[tuple[str, str], int] = {(row[0], row[1]): int(row[2]) for row in conn.execute(thumbs)}
        versions = sorted({*sums, *(v for v, _ in votes)})
        figures = {}
        for version in versions:
            n, scored, total, length = sums.get(version, (0, 0, 0.0, 0))
            figures[version] = VersionFigures(
                answers=int(n), mean_reward=float(total) / scored if scored else None,
                mean_length=float(length or 0) / n if n else None,
                thumbs_up=votes.get((version, "up"), 0), thumbs_down=votes.get((version, "down"), 0),
            )  # fmt: skip
        return figures

    def read_feedback(self, completion_ids: Sequence[str] | None = None) -> dict[str, FeedbackRecord]:
        """The latest thumb per completion: all of them, or those of ``completion_ids``."""
        query = select(feedback)
        if completion_ids is not None:
            query = query.where(feedback.c.completion_id.in_(list(completion_ids)))
        with self.engine.connect() as conn:
            return {
                row["completion_id"]: FeedbackRecord(
                    row["completion_id"], row["key_id"], row["thumb"], row["comment"], row["created"]
                )
                for row in conn.execute(query).mappings()
            }

    def purge(self, older_than_s: float, now: float | None = None) -> Counts:
        """Delete completions, candidates and feedback older than ``older_than_s`` seconds."""
        cutoff = (now if now is not None else time.time()) - older_than_s
        with self.engine.begin() as conn:
            old = select(completions.c.id).where(completions.c.created < cutoff)
            n_cand = conn.execute(delete(candidates).where(candidates.c.completion_id.in_(old))).rowcount
            n_comp = conn.execute(delete(completions).where(completions.c.created < cutoff)).rowcount
            n_fb = conn.execute(delete(feedback).where(feedback.c.created < cutoff)).rowcount
        return Counts(n_comp, n_cand, n_fb)

    def arm_totals(self, versions: Sequence[str], rm_version: str, since: float) -> dict[str, ArmTotals]:
        """Per policy version, sums over its answers scored by ``rm_version`` since ``since`` (the canary gate's
        input): the chosen candidates' rewards, squares and lengths, and the completions' latest thumbs. Two
        aggregate queries, so many replicas' records add up in the database, not in any one gateway."""
        chosen = (
            select(
                completions.c.policy_version,
                func.count(),
                func.sum(candidates.c.reward),
                func.sum(candidates.c.reward * candidates.c.reward),
                func.sum(candidates.c.token_count),
            )
            .join(candidates, candidates.c.completion_id == completions.c.id)
            .where(candidates.c.chosen, candidates.c.reward.is_not(None), completions.c.rm_version == rm_version)
            .where(completions.c.policy_version.in_(versions), completions.c.created >= since)
            .group_by(completions.c.policy_version)
        )
        thumbs = (
            select(completions.c.policy_version, feedback.c.thumb, func.count())
            .join(feedback, feedback.c.completion_id == completions.c.id)
            .where(completions.c.rm_version == rm_version)
            .where(completions.c.policy_version.in_(versions), completions.c.created >= since)
            .group_by(completions.c.policy_version, feedback.c.thumb)
        )
        with self.engine.connect() as conn:
            sums = {row[0]: row[1:] for row in conn.execute(chosen)}
            votes: dict[tuple[str, str], int] = {(row[0], row[1]): int(row[2]) for row in conn.execute(thumbs)}
        result = {}
        for version in versions:
            n, total, squares, length = sums.get(version, (0, 0.0, 0.0, 0))
            result[version] = ArmTotals(
                n=int(n), reward_sum=float(total or 0.0), reward_sq_sum=float(squares or 0.0), length_sum=float(length or 0),
                thumbs_up=votes.get((version, "up"), 0), thumbs_down=votes.get((version, "down"), 0),
            )  # fmt: skip
        return result

    def close(self) -> None:
        self.engine.dispose()


def _engine(url: str, connect_timeout_s: float, busy_timeout_s: float, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:" and not path.startswith("file:"):  # a URI filename (uri=true) names its own
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": busy_timeout_s})  # sqlite3's busy timeout

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers (the exporter) never block the writer
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            cursor.close()

        return engine
    return create_engine(
        url,
        echo=echo,
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=2,
        connect_args={"connect_timeout": max(1, round(connect_timeout_s))},
    )


def _latest_thumbs(thumbs: list[FeedbackRecord]) -> list[FeedbackRecord]:
    """One row per completion (a batch may hold repeats; one statement cannot upsert a key twice)."""
    latest: dict[str, FeedbackRecord] = {}
    for t in thumbs:
        if t.completion_id not in latest or t.created >= latest[t.completion_id].created:
            latest[t.completion_id] = t
    return list(latest.values())


def _completion_row(r: CompletionRecord) -> dict[str, Any]:
    return {
        "id": r.id, "created": r.created, "key_id": r.key_id, "messages": r.messages, "params": r.params,
        "policy_version": r.policy_version, "rm_version": r.rm_version, "n_candidates": r.n_candidates,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "timings_ms": r.timings_ms,
        "status": r.status,
    }  # fmt: skip


def _candidate_row(completion_id: str, c: CandidateRecord) -> dict[str, Any]:
    return {
        "completion_id": completion_id, "idx": c.index, "text": c.text, "token_ids": c.token_ids,
        "token_count": c.token_count, "finish_reason": c.finish_reason, "reward": c.reward, "scores": c.scores,
        "logprob_sum": c.logprob_sum, "logprob_mean": c.logprob_mean, "chosen": c.chosen,
    }  # fmt: skip


def _feedback_row(r: FeedbackRecord) -> dict[str, Any]:
    return {"completion_id": r.completion_id, "key_id": r.key_id, "thumb": r.thumb, "comment": r.comment, "created": r.created}


def _completion_record(row: Any, cands: list[CandidateRecord]) -> CompletionRecord:
    return CompletionRecord(
        id=row["id"], created=row["created"], key_id=row["key_id"], messages=row["messages"], params=row["params"],
        policy_version=row["policy_version"], rm_version=row["rm_version"], n_candidates=row["n_candidates"],
        prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"], timings_ms=row["timings_ms"],
        candidates=cands, status=row["status"],
    )  # fmt: skip


def _candidate_record(row: Any) -> CandidateRecord:
    return CandidateRecord(
        index=row["idx"], text=row["text"], token_ids=row["token_ids"], finish_reason=row["finish_reason"],
        reward=row["reward"], scores=row["scores"], logprob_sum=row["logprob_sum"], logprob_mean=row["logprob_mean"],
        chosen=bool(row["chosen"]), tokens=row["token_count"] if row["token_count"] != len(row["token_ids"]) else None,
    )  # fmt: skip
