"""The gate's decisions judged against gold (``toyworld.loop.trials``): constructed arms, and a real log."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.store.records import CandidateRecord, CompletionRecord
from gateway.store.sql import SqlStore
from toyworld.gold import gold_reward
from toyworld.loop.trials import agreement, judge, served_gold


def test_a_decision_agrees_only_with_a_significant_gold_difference_of_its_sign() -> None:
    better, worse = [0.9, 0.8, 0.85, 0.95] * 10, [0.5, 0.6, 0.55, 0.45] * 10
    promoted = judge("promote", better, worse)
    assert promoted is not None
    assert promoted.significant
    assert promoted.agrees is True
    wrongly = judge("rollback", better, worse)
    assert wrongly is not None
    assert wrongly.agrees is False
    same = judge("rollback", [0.5, 0.9, 0.1, 0.7], [0.6, 0.8, 0.2, 0.6])
    assert same is not None
    assert not same.significant
    assert same.agrees is None
    assert judge("promote", [0.5], worse) is None
    summary = agreement([promoted, wrongly, same])
    assert (summary["trials"], summary["significant"], summary["agree"], summary["share"]) == (3, 2, 1, 0.5)
    assert agreement([same])["share"] is None


def test_served_gold_reads_each_versions_chosen_answers_in_the_trials_window(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = SqlStore(url)
    store.migrate()
    now = time.time()
    question = "What is 2 + 3?"

    def record(cid: str, version: str, created: float, chosen: str, other: str) -> CompletionRecord:
        cands = [CandidateRecord(0, other, [1], "stop", 0.0), CandidateRecord(1, chosen, [2], "stop", 1.0, chosen=True)]
        return CompletionRecord(cid, created, "k", [{"role": "user", "content": question}], {}, version, "rm-base", 2, 1, 1,
                                {}, cands)  # fmt: skip

    store.write([
        record("a", "v0002", now, "2 + 3 = 5. Glad to help!", "7"),
        record("b", "v0001", now, "It is 9.", "5"),
        record("c", "v0002", now - 100, "5", "5"),  # before the trial
        record("d", "v0003", now, "5", "5"),  # another version
    ])  # fmt: skip
    store.close()
    arms = served_gold(url, ["v0002", "v0001"], now - 10, now + 10)
    assert arms == {"v0002": [gold_reward(question, "2 + 3 = 5. Glad to help!")], "v0001": [gold_reward(question, "It is 9.")]}
    assert arms["v0002"][0] > arms["v0001"][0]
