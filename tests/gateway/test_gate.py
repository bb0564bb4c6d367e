"""The canary gate's statistics on constructed outcomes: clear win, clear loss, too little data, guardrails."""

from __future__ import annotations

import random

import pytest

from gateway.gate import ArmTotals, GateRules, decide, look_number

RULES = GateRules(min_requests=100, looks=4, alpha=0.05, reward_margin=0.05, min_thumbs=30, max_length_ratio=1.3, max_kl=8.0)


def totals(
    mean: float, n: int, *, sd: float = 1.0, length: float = 20.0, up_rate: float | None = None, seed: int = 0
) -> ArmTotals:
    """An arm with ``n`` answers whose rewards are drawn around ``mean``; thumbs on a fifth of them."""
    rng = random.Random(seed)
    rewards = [rng.gauss(mean, sd) for _ in range(n)]
    thumbs = n // 5 if up_rate is not None else 0
    ups = sum(rng.random() < (up_rate or 0.0) for _ in range(thumbs))
    return ArmTotals(
        n=n, reward_sum=sum(rewards), reward_sq_sum=sum(r * r for r in rewards), length_sum=length * n,
        thumbs_up=ups, thumbs_down=thumbs - ups,
    )  # fmt: skip


def test_totals_give_the_sample_mean_and_variance() -> None:
    arm = ArmTotals(n=4, reward_sum=10.0, reward_sq_sum=30.0, length_sum=80.0, thumbs_up=3, thumbs_down=1)
    assert arm.reward_mean == 2.5
    assert arm.reward_var == pytest.approx((30.0 - 100.0 / 4) / 3)
    assert arm.length_mean == 20.0
    assert arm.up_rate == 0.75


def test_too_little_data_waits() -> None:
    decision = decide(totals(0.0, 500), totals(2.0, 99, seed=1), RULES)
    assert decision.action == "wait"
    assert "too little data" in decision.reason


def test_a_clear_win_is_promoted() -> None:
    decision = decide(totals(0.0, 400), totals(0.5, 100, seed=1), RULES)
    assert decision.action == "promote"
    assert decision.reward_diff is not None
    assert decision.reward_diff.low > 0


def test_a_clear_loss_is_rolled_back() -> None:
    decision = decide(totals(0.0, 400), totals(-0.6, 100, seed=1), RULES)
    assert decision.action == "rollback"
    assert "reward fell" in decision.reason


def test_an_equal_version_waits_then_is_promoted_once_shown_non_inferior() -> None:
    early = decide(totals(0.0, 2000), totals(0.0, 100, seed=1, sd=1.0), RULES)
    assert early.action == "wait"  # the interval (±0.3 at 100 answers) still allows a loss beyond the margin
    late = decide(totals(0.0, 20000), totals(0.0, 5000, seed=1, sd=0.5), RULES)
    assert late.action == "promote"


def test_an_undecided_canary_is_rolled_back_at_the_last_look() -> None:
    current, canary = totals(0.0, 4000, sd=3.0), totals(-0.05, 800, seed=2, sd=3.0)
    assert look_number(canary.n, RULES) == 4
    decision = decide(current, canary, RULES)
    assert decision.action == "rollback"
    assert "not shown as good" in decision.reason


def test_longer_answers_fail_even_when_the_reward_rises() -> None:
    decision = decide(totals(0.0, 400, length=20), totals(1.0, 100, seed=1, length=40), RULES)
    assert decision.action == "rollback"
    assert "longer" in decision.reason


def test_kl_beyond_the_bound_fails_even_when_the_reward_rises() -> None:
    decision = decide(totals(0.0, 400), totals(1.0, 100, seed=1), RULES, canary_kl=12.0, canary_kl_stderr=0.4)
    assert decision.action == "rollback"
    assert "KL to the starting policy 12.00 ± 0.40 nats exceeds 8.0" in decision.reason


def test_falling_thumbs_fail_even_when_the_reward_rises() -> None:
    current, canary = totals(0.0, 1000, up_rate=0.8), totals(0.5, 1000, seed=1, up_rate=0.3)
    decision = decide(current, canary, RULES)
    assert decision.action == "rollback"
    assert "thumbs-up rate fell" in decision.reason


def test_peeking_is_paid_for_with_a_stricter_interval() -> None:
    """A canary exactly at the margin (reward 0.05 lower) looked at 4 times is promoted in at most alpha/2 of runs
    over all looks together (Bonferroni); an interval at the full alpha at each look would promote in ~7%."""
    runs, promoted = 400, 0
    for seed in range(runs):
        rng = random.Random(seed)
        current = totals(0.0, 8000, seed=100_000 + seed)
        rewards = [rng.gauss(-RULES.reward_margin, 1.0) for _ in range(800)]
        for n in (100, 200, 400, 800):
            canary = ArmTotals(
                n=n, reward_sum=sum(rewards[:n]), reward_sq_sum=sum(r * r for r in rewards[:n]), length_sum=20.0 * n
            )
            if decide(current, canary, RULES).action == "promote":
                promoted += 1
                break
    assert promoted <= runs * RULES.alpha / 2
