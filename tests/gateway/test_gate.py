"""The canary gate's statistics on constructed outcomes: clear win, clear loss, too little data, guardrails, and the
thumbs-primary design (its plan's power and error rate checked by simulation)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from gateway.gate import ArmTotals, GateRules, decide, look_number, plan, primary_for

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


THUMBS = GateRules(min_requests=100, looks=3, alpha=0.05, min_thumbs=30, thumbs_margin=0.1, guard_reward_margin=0.3, power=0.8)


def voted(reward: float, n: int, ups: int, downs: int, *, sd: float = 1.0, length: float = 20.0) -> ArmTotals:
    """``n`` answers with this mean reward and standard deviation, and these thumbs."""
    return ArmTotals(
        n=n, reward_sum=reward * n, reward_sq_sum=sd**2 * (n - 1) + reward**2 * n, length_sum=length * n,
        thumbs_up=ups, thumbs_down=downs,
    )  # fmt: skip


def test_a_version_trained_mainly_on_thumbs_is_judged_on_thumbs() -> None:
    assert primary_for(THUMBS, 0.9) == "thumbs"
    assert primary_for(THUMBS, 0.5) == "thumbs"
    assert primary_for(THUMBS, 0.2) == "reward"
    assert primary_for(THUMBS, None) == "reward"
    assert primary_for(GateRules(primary="reward"), 1.0) == "reward"
    assert primary_for(GateRules(primary="thumbs"), 0.0) == "thumbs"


def test_the_thumbs_plan_is_sized_from_the_margin_and_halved_for_earlier_looks() -> None:
    schedule = plan(THUMBS, "thumbs", voted(0, 1000, 120, 80), voted(0, 1000, 110, 90))
    # (z at 0.05 / 3 two-sided + z at 0.8)^2 * (0.25 + 0.25) / 0.1^2 = (2.394 + 0.842)^2 * 50 = 523.6
    assert schedule.looks_at == (131, 262, 524)
    assert schedule.powered == 524
    assert schedule.unit == "thumbs"
    assert schedule.answers_needed == 524 * 5  # a fifth of the answers are thumbed so far
    assert plan(THUMBS, "thumbs", voted(0, 100, 0, 0), voted(0, 100, 0, 0)).answers_needed is None
    reward = plan(THUMBS, "reward", voted(0, 1000, 0, 0, sd=1.0), voted(0, 500, 0, 0, sd=1.0))
    assert reward.looks_at == (100, 200, 400)
    assert reward.powered == 8376  # (2.394 + 0.842)^2 * (1 + 1) / 0.05^2 (reward_margin): 16 times 523.6
    assert reward.unit == "answers"


def test_the_last_thumbs_look_has_its_power_and_peeking_keeps_the_error_rate() -> None:
    """Equal up-rates (0.5): at the last look the gate shows non-inferiority in ~80% of trials (the plan's power).
    Canary exactly at the margin (0.1 lower), looked at at each planned look: promoted in at most alpha/2 of trials."""
    rng = np.random.default_rng(0)
    last = plan(THUMBS, "thumbs", ArmTotals(), ArmTotals()).looks_at[-1]
    trials = 2000
    promoted = 0
    for _ in range(trials):
        up_current, up_canary = (int(x) for x in rng.binomial(last, 0.5, size=2))
        current = voted(0.0, 5 * last, up_current, last - up_current)
        canary = voted(0.0, 5 * last, up_canary, last - up_canary)
        promoted += decide(current, canary, THUMBS, primary="thumbs").action == "promote"
    assert 0.76 <= promoted / trials <= 0.84
    wrongly = 0
    schedule = plan(THUMBS, "thumbs", ArmTotals(), ArmTotals()).looks_at
    for _ in range(trials):
        current_votes, canary_votes = rng.random(last) < 0.5, rng.random(last) < 0.4
        for at in schedule:
            up_current, up_canary = int(current_votes[:at].sum()), int(canary_votes[:at].sum())
            current = voted(0.0, 5 * at, up_current, at - up_current)
            canary = voted(0.0, 5 * at, up_canary, at - up_canary)
            action = decide(current, canary, THUMBS, primary="thumbs").action
            if action != "wait":
                wrongly += action == "promote"
                break
    assert wrongly <= trials * THUMBS.alpha / 2


def test_thumbs_primary_promotes_a_version_the_reward_model_dislikes_when_users_like_it() -> None:
    """What the loop measured: a thumbs-trained version refused for a reward drop of 0.25 while gold rose."""
    current = voted(0.8, 1500, ups=150, downs=150)
    canary = voted(0.55, 1500, ups=220, downs=80)
    assert decide(current, canary, THUMBS, primary="reward").action == "rollback"
    decision = decide(current, canary, THUMBS, primary="thumbs")
    assert decision.action == "promote"
    assert decision.primary == "thumbs"
    assert "within its guardrail" in decision.reason


def test_thumbs_primary_keeps_the_reward_length_and_kl_as_guardrails() -> None:
    current = voted(0.8, 1500, ups=150, downs=150)
    liked = voted(0.8, 1500, ups=220, downs=80)
    fell = decide(current, voted(0.2, 1500, ups=220, downs=80), THUMBS, primary="thumbs")
    assert fell.action == "rollback"
    assert "guardrail 0.3" in fell.reason
    longer = voted(0.8, 1500, ups=220, downs=80, length=40.0)
    assert "longer" in decide(current, longer, THUMBS, primary="thumbs").reason
    assert "KL" in decide(current, liked, THUMBS, canary_kl=9.0, primary="thumbs").reason


def test_thumbs_primary_waits_for_thumbs_rolls_back_a_loss_and_an_undecided_last_look() -> None:
    current = voted(0.8, 1500, ups=60, downs=60)
    few = decide(current, voted(0.8, 1500, ups=60, downs=60), THUMBS, primary="thumbs")
    assert few.action == "wait"
    assert "131 thumbs" in few.reason
    worse = decide(voted(0.8, 1500, ups=100, downs=40), voted(0.8, 1500, ups=40, downs=100), THUMBS, primary="thumbs")
    assert worse.action == "rollback"
    assert "thumbs-up rate fell" in worse.reason
    middle = decide(voted(0.8, 3000, ups=300, downs=300), voted(0.8, 3000, ups=270, downs=330), THUMBS, primary="thumbs")
    assert middle.look == 3
    assert middle.action == "rollback"
    assert "not shown as good on thumbs" in middle.reason


def test_a_planning_rate_near_the_observed_one_shrinks_the_schedule_and_keeps_power_and_error_rate() -> None:
    """Sized for rates of 0.85 (variance 0.1275 per arm, not 0.25): about half the thumbs. Equal arms at 0.85 are
    promoted at the last look with the plan's power; a canary at the margin (0.75), looked at at every look, at most
    alpha/2 of the time, as with the worst-case plan: every look's interval uses the rates it observes."""
    rules = replace(THUMBS, planning_up_rate=0.85)
    schedule = plan(rules, "thumbs", ArmTotals(), ArmTotals())
    # (2.394 + 0.842)^2 * 2 * 0.85 * 0.15 / 0.1^2 = 266.96
    assert schedule.looks_at == (67, 134, 267)
    rng = np.random.default_rng(1)
    trials, last = 2000, schedule.looks_at[-1]
    promoted = 0
    for _ in range(trials):
        up_current, up_canary = (int(x) for x in rng.binomial(last, 0.85, size=2))
        current, canary = voted(0.0, 5 * last, up_current, last - up_current), voted(0.0, 5 * last, up_canary, last - up_canary)
        promoted += decide(current, canary, rules, primary="thumbs").action == "promote"
    assert 0.74 <= promoted / trials <= 0.86
    wrongly = 0
    for _ in range(trials):
        current_votes, canary_votes = rng.random(last) < 0.85, rng.random(last) < 0.75
        for at in schedule.looks_at:
            up_current, up_canary = int(current_votes[:at].sum()), int(canary_votes[:at].sum())
            current, canary = voted(0.0, 5 * at, up_current, at - up_current), voted(0.0, 5 * at, up_canary, at - up_canary)
            action = decide(current, canary, rules, primary="thumbs").action
            if action != "wait":
                wrongly += action == "promote"
                break
    assert wrongly <= trials * rules.alpha / 2
