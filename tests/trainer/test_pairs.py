"""Pair building: the policies, the margin, thumbs overriding the reward model, KTO, dedup."""

from __future__ import annotations

import time

from gateway.store.records import PRUNED, CandidateRecord, CompletionRecord, FeedbackRecord
from trainer.pairs import build, weighted
from trainer.settings import PairSettings


def record(cid: str, *answers: tuple[str, float | None], served: int = 0, prompt: str = "What is 2 plus 2?") -> CompletionRecord:
    return CompletionRecord(
        id=cid,
        created=time.time(),
        key_id="k",
        messages=[{"role": "user", "content": prompt}],
        params={},
        policy_version="base",
        rm_version="rm-base",
        n_candidates=len(answers),
        prompt_tokens=5,
        completion_tokens=5,
        timings_ms={},
        candidates=[
            CandidateRecord(i, text, [i, i + 1], "stop", reward=reward, chosen=i == served)
            for i, (text, reward) in enumerate(answers)
        ],
    )


def thumb(cid: str, value: str) -> FeedbackRecord:
    return FeedbackRecord(cid, "k", value, None, time.time())  # type: ignore[arg-type]


def texts(row: dict[str, object]) -> tuple[str, str]:
    return row["chosen"][0]["content"], row["rejected"][0]["content"]  # type: ignore[index]


FOUR = (("4.", 2.0), ("Five.", -1.0), ("It is 4, friend.", 1.0), ("Ugh. 4.", 0.5))


def test_best_vs_worst_is_one_conversational_pair_with_metadata() -> None:
    out = build([(record("c1", *FOUR), None)], PairSettings())
    [row] = out.pairs
    assert row["prompt"] == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert texts(row) == ("4.", "Five.")
    assert (row["chosen_reward"], row["rejected_reward"], row["margin"]) == (2.0, -1.0, 3.0)
    assert (row["source"], row["thumb"], row["completion_id"], row["policy_version"]) == ("reward_model", None, "c1", "base")
    assert (row["chosen_token_ids"], row["rejected_token_ids"]) == ([0, 1], [1, 2])


def test_best_vs_each_and_the_minimum_margin() -> None:
    every = build([(record("c1", *FOUR), None)], PairSettings(policy="best_vs_each"))
    assert [texts(r) for r in every.pairs] == [("4.", "It is 4, friend."), ("4.", "Ugh. 4."), ("4.", "Five.")]
    wide = build([(record("c1", *FOUR), None)], PairSettings(policy="best_vs_each", min_margin=1.2))
    assert [texts(r) for r in wide.pairs] == [("4.", "Ugh. 4."), ("4.", "Five.")]
    assert wide.stats.below_margin == 1


def test_candidates_pruned_while_decoding_make_no_pair() -> None:
    # a partial answer's partial reward is not compared with whole answers, even when it is the lowest or the highest
    rec = record("c1", ("4.", 2.0), ("Fi", -3.0), ("It is 4, friend.", 1.0), ("Ugh", 5.0))
    for pruned in (1, 3):
        rec.candidates[pruned].finish_reason = PRUNED
    every = build([(rec, None)], PairSettings(policy="best_vs_each"))
    assert [texts(r) for r in every.pairs] == [("4.", "It is 4, friend.")]
    down = build([(rec, thumb("c1", "down"))], PairSettings())
    assert [texts(r) for r in down.pairs] == [("It is 4, friend.", "4.")]


def test_ties_and_repeated_texts_make_no_pair() -> None:
    out = build([(record("c1", ("4.", 1.0), ("4.", 1.0), ("Four.", 1.0)), None)], PairSettings(policy="best_vs_each"))
    assert out.pairs == []
    assert out.stats.below_margin == 1  # "4." twice counts once: one tie, not two


def test_a_thumb_down_makes_the_served_answer_rejected_against_the_best_other() -> None:
    out = build([(record("c1", *FOUR), thumb("c1", "down"))], PairSettings(min_margin=10.0))
    [row] = out.pairs
    assert texts(row) == ("It is 4, friend.", "4.")
    assert (row["source"], row["thumb"], row["margin"]) == ("thumb", "down", -1.0)
    assert out.stats.from_thumbs == 1


def test_a_thumb_up_waives_the_margin_and_thumbs_can_be_turned_off() -> None:
    close = record("c1", ("4.", 1.0), ("Four.", 0.9))
    assert build([(close, None)], PairSettings(min_margin=0.5)).pairs == []
    [row] = build([(close, thumb("c1", "up"))], PairSettings(min_margin=0.5)).pairs
    assert (texts(row), row["source"]) == (("4.", "Four."), "thumb")
    [ignored] = build([(record("c2", *FOUR), thumb("c2", "down"))], PairSettings(thumbs_override=False)).pairs
    assert texts(ignored) == ("4.", "Five.")


def test_training_repeats_thumb_decided_pairs_by_their_weight() -> None:
    out = build([(record("c1", *FOUR), thumb("c1", "down")), (record("c2", *FOUR, prompt="And 2 + 3?"), None)], PairSettings())
    by_source = [r["source"] for r in out.pairs]
    assert by_source == ["thumb", "reward_model"]
    assert [r["source"] for r in weighted(out.pairs, 3)] == ["thumb", "thumb", "thumb", "reward_model"]
    assert weighted(out.pairs, 1) == out.pairs
    only = build([(record("c1", *FOUR), thumb("c1", "down")), (record("c2", *FOUR, prompt="And 2 + 3?"), None)],
                 PairSettings(from_reward_model=False))  # fmt: skip
    assert [r["source"] for r in only.pairs] == ["thumb"]
    assert only.stats.unthumbed == 1


def test_a_thumb_with_nothing_to_pair_is_exported_unpaired_for_kto() -> None:
    single = record("c1", ("4.", None))
    repeated = record("c2", ("Five.", 0.2), ("Five.", 0.2), prompt="What is 3 plus 3?")
    out = build(
        [(single, thumb("c1", "up")), (repeated, thumb("c2", "down")), (record("c3", ("6.", None)), None)], PairSettings()
    )
    assert out.pairs == []
    assert [(u["completion"][0]["content"], u["label"], u["completion_id"]) for u in out.unpaired] == [
        ("4.", True, "c1"),
        ("Five.", False, "c2"),
    ]
    assert out.stats.unscored == 1  # c3: no reward, no thumb


def test_the_same_pair_from_two_completions_is_kept_once() -> None:
    out = build(
        [(record("c1", *FOUR), None), (record("c2", *FOUR), None), (record("c3", *FOUR, prompt="Hi"), None)], PairSettings()
    )
    assert [r["completion_id"] for r in out.pairs] == ["c1", "c3"]
    assert out.stats.duplicates == 1


def test_one_key_cannot_decide_more_than_its_share_of_thumbs() -> None:
    """Feedback poisoning: past ``max_thumbs_per_key`` a key's thumbs are ignored and its completions rank by reward."""
    labelled = [(record(f"c{i}", *FOUR, prompt=f"What is {i} plus 2?"), thumb(f"c{i}", "down")) for i in range(5)]
    other = record("c9", *FOUR, prompt="What is 9 plus 2?")
    other.key_id = "someone-else"
    labelled.append((other, FeedbackRecord("c9", "someone-else", "down", None, time.time())))
    out = build(labelled, PairSettings(max_thumbs_per_key=2))
    assert out.stats.capped_thumbs == 3
    assert [p["completion_id"] for p in out.pairs if p["source"] == "thumb"] == ["c0", "c1", "c9"]
    uncapped = build(labelled, PairSettings())
    assert (uncapped.stats.capped_thumbs, uncapped.stats.from_thumbs) == (0, 6)
