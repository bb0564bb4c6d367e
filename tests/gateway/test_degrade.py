"""Fewer candidates instead of failing (``gateway.degrade``): the rules on numbers, and a slow reward model through the app."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from gateway.degrade import ScorerPace, under_load, within_pace
from tests.gateway.conftest import REWARDS
from tests.gateway.fakes import FakeScorer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.mark.parametrize(
    ("in_flight", "expected"), [(1, 8), (16, 8), (17, 7), (32, 4), (64, 2), (128, 1), (10_000, 1)]
)  # fmt: skip
def test_under_load_n_scales_down_to_the_answers_asked_for(in_flight: int, expected: int) -> None:
    assert under_load(8, 1, in_flight, degrade_above=16) == expected
    assert under_load(8, 3, in_flight, degrade_above=16) == max(3, expected)
    assert under_load(8, 1, in_flight, degrade_above=0) == 8  # off


def test_within_pace_n_fits_the_budget() -> None:
    assert within_pace(8, 1, per_candidate_s=0.010, budget_ms=100) == 8  # 80 ms fits
    assert within_pace(8, 1, per_candidate_s=0.025, budget_ms=100) == 4
    assert within_pace(8, 1, per_candidate_s=1.0, budget_ms=100) == 1
    assert within_pace(8, 2, per_candidate_s=1.0, budget_ms=100) == 2
    assert within_pace(8, 1, per_candidate_s=1.0, budget_ms=None) == 8  # off


def test_the_pace_averages_and_fades_with_time() -> None:
    pace = ScorerPace(half_life_s=10)
    assert pace.per_candidate_s(now=0) == 0
    pace.observe(0.4, 4, now=0)  # 0.1 s per candidate
    assert pace.per_candidate_s(now=0) == pytest.approx(0.1)
    pace.observe(0.8, 4, now=0)  # 0.2 s per candidate, weighted in
    assert pace.per_candidate_s(now=0) == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)
    assert pace.per_candidate_s(now=10) == pytest.approx((0.7 * 0.1 + 0.3 * 0.2) / 2)  # a half-life later
    assert pace.per_candidate_s(now=1000) < 1e-20


def test_a_slow_reward_model_lowers_n_and_the_answer_says_so(make_client: Callable[..., TestClient]) -> None:
    scorer = FakeScorer(REWARDS, delay_s=0.4)  # 0.1 s per candidate at N=4
    client = make_client(scorer=scorer, scorer_settings={"degrade_above_ms": 150, "deadline_ms": 5000})
    body = {"model": "toy-bon", "messages": MESSAGES, "n_candidates": 4, "return_candidates": True}
    first = client.post(CHAT, json=body)  # the pace is not known yet: full N, and now it is
    assert first.status_code == 200
    assert "x-bon-degraded" not in first.headers
    assert len(first.json()["candidates"]) == 4
    second = client.post(CHAT, json=body)  # 0.1 s per candidate against 150 ms: one candidate fits
    assert second.headers["x-bon-degraded"] == "scorer_slow"
    assert second.json()["degraded"] == "scorer_slow"
    assert len(second.json()["candidates"]) == 1
    metrics = client.get("/metrics").text
    assert 'bon_degraded_total{reason="scorer_slow"} 1.0' in metrics
    several = client.post(CHAT, json={**body, "n": 2})  # never below the answers asked for
    assert len(several.json()["choices"]) == 2
    assert several.headers["x-bon-degraded"] == "scorer_slow"
