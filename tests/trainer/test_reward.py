"""The reward-model refit's data and check (``trainer.reward``), without a model: how thumbs split, how pairs name their
answers, and when the held-out change is evidence enough. The refit itself runs in ``test_algorithms``."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from trainer import reward


def _labelled(ups: int, downs: int, prefix: str = "c") -> list[reward.Labelled]:
    out: list[reward.Labelled] = []
    for i in range(ups + downs):
        cid = f"{prefix}{i}"
        served = CandidateRecord(0, f"answer {i}", [], "stop", 0.0, chosen=True)
        record = CompletionRecord(cid, 0.0, "k", [{"role": "user", "content": f"q{i % 7}"}], {}, "base", "rm-base", 1, 1,
                                  1, {}, [served])  # fmt: skip
        out.append((record, FeedbackRecord(cid, "k", "up" if i < ups else "down", None, 0.0)))
    return out


def test_thumbs_are_held_out_by_side_stably_and_the_held_out_part_is_every_up_against_every_down() -> None:
    labelled = _labelled(400, 60)
    data = reward.thumb_pairs(labelled, every=5, every_down=2, max_pairs=3000, seed=0)
    held_ups = {p["chosen_id"] for p in data.held_out}
    held_downs = {p["rejected_id"] for p in data.held_out}
    assert len(data.held_out) == len(held_ups) * len(held_downs)  # the full grid, not a draw
    assert 0.12 < len(held_ups) / 400 < 0.28  # about a fifth of the ups (a hash decides)
    assert 0.35 < len(held_downs) / 60 < 0.65  # about half of the downs
    trained = {p["chosen_id"] for p in data.train} | {p["rejected_id"] for p in data.train}
    assert trained.isdisjoint(held_ups | held_downs)
    assert len(data.train) == 3000  # drawn down to max_pairs (the held-out grid, 2,516 pairs here, fits)
    # Stable: an answer's side of the split does not depend on what else the window holds
    again = reward.thumb_pairs(labelled[::3], every=5, every_down=2, max_pairs=3000, seed=1)
    assert {p["chosen_id"] for p in again.held_out} <= held_ups
    assert {p["rejected_id"] for p in again.held_out} <= held_downs


def test_candidate_pairs_split_by_their_thumb() -> None:
    pairs = [{"completion_id": f"c{i}", "thumb": "down" if i % 2 else "up"} for i in range(2000)]
    data = reward.split(pairs, every=5, every_down=2)
    held = [p["thumb"] for p in data.held_out]
    assert 0.15 < held.count("up") / 1000 < 0.25
    assert 0.45 < held.count("down") / 1000 < 0.55


def _pair(chosen: str, rejected: str) -> dict[str, Any]:
    return {"chosen_id": chosen, "rejected_id": rejected}


def test_members_name_a_candidate_pair_by_its_served_answer() -> None:
    def candidate(thumb: str) -> dict[str, Any]:
        return {"completion_id": "c1", "thumb": thumb, "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip

    assert reward.members(candidate("up"), 3) == ("c1#served", "c1#b#3")
    assert reward.members(candidate("down"), 4) == ("c1#a#4", "c1#served")
    assert reward.members(_pair("u", "d"), 0) == ("u", "d")


def _grid(ups: int, downs: int) -> list[dict[str, Any]]:
    return [_pair(f"u{i}", f"d{j}") for i in range(ups) for j in range(downs)]


def test_a_check_passes_on_an_improvement_shown_over_enough_answers() -> None:
    pairs = _grid(8, 6)
    check = reward.Check.of(pairs, [0.0] * len(pairs), [1.0] * len(pairs), 0.9)
    assert (check.before, check.after, check.chosen, check.rejected, check.pairs) == (0.0, 1.0, 8, 6, 48)
    assert check.verdict(min_answers=5, margin=0.0, accept="no_loss") is None
    assert check.verdict(min_answers=5, margin=0.0, accept="gain") is None
    assert check.describe() == "0.000 -> 1.000, change +1.000 [+1.000, +1.000] over 8 chosen and 6 rejected answers (90%)"


def test_sixteen_ups_against_one_down_cannot_pass() -> None:
    """Run 6's refits: 16 held-out pairs that were 16 ups against 1 down passed the old check (after >= before)."""
    pairs = _grid(16, 1)
    check = reward.Check.of(pairs, [0.0] * 16, [1.0] * 16, 0.9)
    assert check.after == 1.0
    assert (check.change.low, check.change.high) == (-math.inf, math.inf)
    assert check.verdict(min_answers=5, margin=0.0, accept="no_loss") == (
        "too few held-out answers to judge (16 on the chosen side, 1 on the rejected; trainer.reward.min_held_out is 5)"
    )
    assert check.verdict(min_answers=1, margin=0.0, accept="gain") == "the change's lower bound is not above +0.000"
    assert check.verdict(min_answers=1, margin=0.0, accept="no_loss") is None  # judged on one down: no evidence that it lost


def test_no_change_is_not_an_improvement_but_a_margin_can_accept_it() -> None:
    """Half the pairs gain, half lose, spread over the answers: the change is 0 with an interval on both sides."""
    pairs = _grid(10, 10)
    before = [float((i + j) % 2) for i in range(10) for j in range(10)]
    after = [float((i + j + 1) % 2) for i in range(10) for j in range(10)]
    check = reward.Check.of(pairs, before, after, 0.9)
    assert check.change.estimate == pytest.approx(0.0)
    assert check.verdict(min_answers=5, margin=0.0, accept="gain") == "the change's lower bound is not above +0.000"
    assert check.change.low == pytest.approx(0.0)  # every answer's mean change is 0: no spread at all
    assert check.verdict(min_answers=5, margin=0.1, accept="gain") is None  # shown to lose at most 0.1 (nothing, here)
    assert check.verdict(min_answers=5, margin=0.0, accept="no_loss") is None  # no_loss: not shown to lose
    wide = reward.Check.of(pairs, before[:50] + [1.0] * 50, after[:50] + [0.0] * 50, 0.9)  # the second half of ups lost
    assert wide.change.estimate == pytest.approx(-0.5)
    assert wide.change.low < -0.5 < wide.change.high
    assert wide.verdict(min_answers=5, margin=0.2, accept="gain") == "the change's lower bound is not above -0.200"


def test_no_loss_refuses_a_refit_shown_to_lose_and_a_margin_tolerates_a_small_loss() -> None:
    """Every held-out pair the current model ordered as the thumbs do, the refit orders the other way on most."""
    pairs = _grid(8, 6)
    after = [0.0 if (i * 6 + j) % 4 else 1.0 for i in range(8) for j in range(6)]  # a quarter kept
    check = reward.Check.of(pairs, [1.0] * len(pairs), after, 0.9)
    assert check.change.estimate == pytest.approx(-0.75)
    assert check.change.high < -0.5
    assert check.verdict(min_answers=5, margin=0.0, accept="no_loss") == (
        "the change's upper bound is below +0.000: it lost agreement"
    )
    assert check.verdict(min_answers=5, margin=0.5, accept="no_loss") == (
        "the change's upper bound is below -0.500: it lost agreement"
    )
    assert check.verdict(min_answers=5, margin=0.99, accept="no_loss") is None  # a loss within the margin
    assert check.verdict(min_answers=7, margin=0.0, accept="no_loss") == (
        "too few held-out answers to judge (8 on the chosen side, 6 on the rejected; trainer.reward.min_held_out is 7)"
    )
