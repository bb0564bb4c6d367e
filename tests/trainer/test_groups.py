"""Served best-of-N requests as RL groups (``trainer.groups``): which completions are groups, the thumb folded into the
rewards, and GRPO's and RLOO's advantages by hand."""

from __future__ import annotations

from statistics import fmean, pstdev

import pytest

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from trainer.groups import Group, advantages, build, folded


def record(rewards: list[float | None], logprobs: list[float | None] | None = None, served: int = 0,
           cid: str = "c") -> CompletionRecord:  # fmt: skip
    logprobs = logprobs or [-1.0] * len(rewards)
    cands = [CandidateRecord(i, f"answer {i}", [i + 1], "stop", r, logprob_sum=lp, chosen=i == served)
             for i, (r, lp) in enumerate(zip(rewards, logprobs, strict=True))]  # fmt: skip
    return CompletionRecord(cid, 0.0, "k", [{"role": "user", "content": "q"}], {}, "v0001", "rm", len(rewards), 1, 1, {}, cands)


def group(rewards: list[float], served: int = 0, thumb: str | None = None) -> Group:
    n = len(rewards)
    return Group("c", "v0001", [], [[1]] * n, ["a"] * n, rewards, [-1.0] * n, served, thumb)  # type: ignore[arg-type]


def test_completions_become_groups_when_every_sample_is_scored_and_has_its_logprob() -> None:
    thumb = FeedbackRecord("a", "k", "up", None, 0.0)
    built = build([
        (record([1.0, 0.0, 0.5], cid="a"), thumb),
        (record([1.0]), None),  # one sample: no group
        (record([1.0, None]), None),  # unscored
        (record([1.0, 0.0], [-1.0, None]), None),  # a sample without its log-prob: no importance weight
        (record([0.3, 0.3]), None),  # all equal: no advantage
    ])  # fmt: skip
    assert [g.completion_id for g in built.groups] == ["a"]
    [g] = built.groups
    assert g.thumb == "up"
    assert g.served == 0
    assert g.answers == [[1], [2], [3]]
    assert g.logprobs == [-1.0, -1.0, -1.0]
    s = built.stats
    assert (s.completions, s.groups, s.samples, s.thumbed, s.too_small, s.unscored, s.no_logprobs, s.flat) == (
        5, 1, 3, 1, 1, 1, 1, 1
    )  # fmt: skip


def test_a_thumb_moves_the_served_answer_past_the_best_or_worst_other_sample() -> None:
    rewards = [0.2, 1.0, 0.0]
    spread = pstdev(rewards)
    assert folded(group(rewards, served=0, thumb="up")) == pytest.approx([1.0 + spread, 1.0, 0.0])
    assert folded(group(rewards, served=1, thumb="down")) == pytest.approx([0.2, 0.0 - spread, 0.0])
    assert folded(group(rewards)) == rewards
    # a flat group a thumb makes informative: the served answer is set one unit apart
    assert folded(group([0.5, 0.5], served=1, thumb="down")) == [0.5, -0.5]


def test_grpo_and_rloo_advantages_by_hand() -> None:
    rewards = [1.0, 0.0, 0.5, 0.5]
    mean, sd = fmean(rewards), pstdev(rewards)
    assert advantages(group(rewards), "group") == pytest.approx([(r - mean) / sd for r in rewards])
    assert advantages(group(rewards), "leave_one_out") == pytest.approx([1.0 - 1 / 3, 0.0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5])
    assert sum(advantages(group(rewards), "leave_one_out")) == pytest.approx(0.0)
    assert advantages(group([0.3, 0.3]), "group") == [0.0, 0.0]
