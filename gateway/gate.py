"""The canary gate's statistics: promote, roll back or wait, from two arms' live totals.

Knows how to compare the canary with the current version on what the gateway logs for
each served answer (the chosen candidate's reward, its length in tokens, the user's thumb)
and on the trainer's KL to the starting policy (from each version's manifest). The rules:
- fewer than ``min_requests`` canary answers (or current answers): wait;
- guardrails first: the canary's mean length above ``max_length_ratio`` × current's, or its
  KL above ``max_kl`` nats: roll back, even when its reward is higher (reward hacking);
- reward: a Welch interval on (canary − current) mean chosen reward; entirely below
  ``−reward_margin``: roll back; entirely above it: promote (non-inferior);
- thumbs (when both arms have ``min_thumbs``): a two-proportion interval on the thumbs-up
  rate; entirely below ``−thumbs_margin``: roll back, and a promotion needs it not to;
- the gate looks at most ``looks`` times (at ``min_requests`` × 1, 2, 4, ...), so each look
  uses ``alpha / looks`` (Bonferroni): repeated peeking does not inflate the error rate;
  at the last look an undecided canary is rolled back (not shown to be as good).
Rewards of different reward-model versions are never compared: the caller gives totals
from one reward model.

The primary comparison is the reward (above) or, for a version trained mainly on thumbs
(the reward model that made the other pairs tends to dislike what thumbs teach), the
thumbs-up rate; then the reward is a guardrail like length and KL (a drop significantly
beyond ``guard_reward_margin`` rolls back) and the looks are planned in thumbs per arm:
the last at the count that shows non-inferiority at ``thumbs_margin`` with ``power`` when
the rates are equal (worst-case variance, fixed before any data, so the schedule cannot
move with the outcome), the earlier ones at halves of it. ``plan`` gives each trial's
schedule and the sample it needs (for the reward too, from the arms' variances), shown to
operators. Does not know where the totals come from or what a decision does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from gateway.intervals import Interval, two_proportions, welch

Action = Literal["promote", "rollback", "wait"]
Primary = Literal["reward", "thumbs"]
THUMBS_MAINLY = 0.5
"""A version whose training pairs were at least this share thumb-decided is judged on thumbs (``primary: auto``)."""


@dataclass(frozen=True)
class ArmTotals:
    """Sums over one version's served answers (what a SQL ``GROUP BY`` gives, so replicas add up)."""

    n: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    length_sum: float = 0.0
    thumbs_up: int = 0
    thumbs_down: int = 0

    @property
    def reward_mean(self) -> float:
        return self.reward_sum / self.n if self.n else math.nan

    @property
    def reward_var(self) -> float:
        """Sample variance (n − 1)."""
        if self.n < 2:
            return math.nan
        return max(0.0, (self.reward_sq_sum - self.reward_sum**2 / self.n) / (self.n - 1))

    @property
    def length_mean(self) -> float:
        return self.length_sum / self.n if self.n else math.nan

    @property
    def thumbs(self) -> int:
        return self.thumbs_up + self.thumbs_down

    @property
    def up_rate(self) -> float:
        return self.thumbs_up / self.thumbs if self.thumbs else math.nan


@dataclass(frozen=True)
class GateRules:
    min_requests: int = 200
    looks: int = 4
    alpha: float = 0.05
    reward_margin: float = 0.05
    min_thumbs: int = 30
    thumbs_margin: float = 0.05
    max_length_ratio: float = 1.3
    max_kl: float | None = 8.0
    primary: Literal["auto", "reward", "thumbs"] = "auto"
    power: float = 0.8
    guard_reward_margin: float = 0.3
    planning_up_rate: float = 0.5


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    look: int
    reward_diff: Interval | None = None
    up_rate_diff: Interval | None = None
    length_ratio: float | None = None
    primary: Primary = "reward"


@dataclass(frozen=True)
class Plan:
    """A trial's schedule: the per-arm counts (``unit``) at which the gate looks, and what the last look needs."""

    primary: Primary
    unit: Literal["answers", "thumbs"]
    looks_at: tuple[int, ...]
    """Counts of ``unit`` at which looks 1, 2, ... are taken: the canary's answers (and current has ``min_requests``),
    or thumbs on each arm (and both have ``min_requests`` answers)."""
    powered: int | None
    """Per-arm count of ``unit`` that shows non-inferiority at the margin with ``power`` when the arms are equal
    (None: not known yet; for the reward it needs both arms' variances)."""
    answers_needed: int | None
    """Per-arm answers the last look needs (thumbs: at the thumb rate seen so far; None: no thumb yet)."""

    def look(self, current: ArmTotals, canary: ArmTotals, min_requests: int) -> int:
        """Which look the arms have reached (0: none yet)."""
        if min(current.n, canary.n) < min_requests:
            return 0
        count = canary.n if self.unit == "answers" else min(current.thumbs, canary.thumbs)
        return sum(1 for at in self.looks_at if count >= at)


def primary_for(rules: GateRules, thumb_share: float | None) -> Primary:
    """The comparison a trial is judged on: ``rules.primary``, or with ``auto`` thumbs for a version trained mainly
    on thumb-decided pairs (``thumb_share``: their share of its training pairs; None: unknown, the reward)."""
    if rules.primary != "auto":
        return rules.primary
    return "thumbs" if thumb_share is not None and thumb_share >= THUMBS_MAINLY else "reward"


def z_per_look(rules: GateRules) -> float:
    """Two-sided normal quantile at ``alpha / looks`` (Bonferroni over the planned looks)."""
    return NormalDist().inv_cdf(1 - rules.alpha / rules.looks / 2)


def powered_n(rules: GateRules, variance_sum: float, margin: float) -> int | None:
    """Per-arm n at which a non-inferiority interval at ``z_per_look`` clears ``−margin`` with ``power`` when the true
    difference is 0: (z_a + z_b)² · (σ₁² + σ₀²) / margin²."""
    if margin <= 0 or not math.isfinite(variance_sum):
        return None
    z = z_per_look(rules) + NormalDist().inv_cdf(rules.power)
    return max(1, math.ceil(z * z * variance_sum / margin**2))


def plan(rules: GateRules, primary: Primary, current: ArmTotals, canary: ArmTotals) -> Plan:
    """The trial's schedule. Reward: looks at ``min_requests`` × 1, 2, 4, ... answers. Thumbs: the last look at the
    powered count of thumbs per arm for both rates at ``planning_up_rate`` (½ by default, the largest variance),
    earlier ones at ½, ¼, ... of it."""
    if primary == "reward":
        looks_at = tuple(rules.min_requests * 2**k for k in range(rules.looks))
        powered = powered_n(rules, canary.reward_var + current.reward_var, rules.reward_margin)
        return Plan("reward", "answers", looks_at, powered, looks_at[-1])
    p = rules.planning_up_rate
    last = powered_n(rules, 2 * p * (1 - p), rules.thumbs_margin) or rules.min_thumbs
    last = max(last, rules.min_thumbs)
    looks_at = tuple(max(rules.min_thumbs, math.ceil(last / 2 ** (rules.looks - 1 - k))) for k in range(rules.looks))
    answers, thumbs = current.n + canary.n, current.thumbs + canary.thumbs
    needed = max(rules.min_requests, math.ceil(last * answers / thumbs)) if thumbs else None
    return Plan("thumbs", "thumbs", looks_at, last, needed)


def look_number(canary_n: int, rules: GateRules) -> int:
    """Which look ``canary_n`` answers reach on the reward's schedule: 0 before ``min_requests``, then 1 at 1×, 2 at
    2×, 3 at 4×, ..."""
    if canary_n < rules.min_requests:
        return 0
    return min(rules.looks, 1 + int(math.log2(canary_n / rules.min_requests)))


def reward_interval(current: ArmTotals, canary: ArmTotals, z: float) -> Interval:
    """Welch on (canary − current) mean chosen reward."""
    return welch(canary.reward_mean, canary.reward_var, canary.n, current.reward_mean, current.reward_var, current.n, z)


def up_rate_interval(current: ArmTotals, canary: ArmTotals, z: float) -> Interval:
    """(canary − current) thumbs-up rate, Agresti–Caffo."""
    return two_proportions(canary.thumbs_up, canary.thumbs, current.thumbs_up, current.thumbs, z)


def decide(
    current: ArmTotals,
    canary: ArmTotals,
    rules: GateRules,
    canary_kl: float | None = None,
    canary_kl_stderr: float | None = None,
    primary: Primary = "reward",
    schedule: Plan | None = None,
) -> Decision:
    """``canary_kl``: the canary's KL to the starting policy (the trainer's estimate, never negative) and its standard
    error, shown in the reason; the guardrail compares the estimate with ``max_kl``. ``primary``: what the trial is
    judged on (``primary_for``). ``schedule``: the trial's ``plan`` when the caller has it already."""
    schedule = schedule or plan(rules, primary, current, canary)
    look = schedule.look(current, canary, rules.min_requests)
    if look == 0:
        if primary == "thumbs":
            return Decision("wait", f"too little data: canary {canary.n} answers and {canary.thumbs} thumbs, current "
                            f"{current.n} and {current.thumbs} (need {rules.min_requests} answers and {schedule.looks_at[0]} "
                            "thumbs)", 0, primary=primary)  # fmt: skip
        return Decision("wait", f"too little data: canary {canary.n}, current {current.n} answers (need {rules.min_requests})",
                        0, primary=primary)  # fmt: skip
    z = z_per_look(rules)
    ratio = canary.length_mean / current.length_mean if current.length_mean > 0 else math.inf
    reward = reward_interval(current, canary, z)
    enough_thumbs = min(current.thumbs, canary.thumbs) >= rules.min_thumbs
    thumbs = up_rate_interval(current, canary, z) if enough_thumbs else None

    def decision(action: Action, reason: str) -> Decision:
        return Decision(action, reason, look, reward, thumbs, ratio, primary)

    if ratio > rules.max_length_ratio:
        return decision("rollback", f"answers grew {ratio:.2f}x longer (limit {rules.max_length_ratio}x)")
    if rules.max_kl is not None and canary_kl is not None and canary_kl > rules.max_kl:
        error = "" if canary_kl_stderr is None else f" ± {canary_kl_stderr:.2f}"
        return decision("rollback", f"KL to the starting policy {canary_kl:.2f}{error} nats exceeds {rules.max_kl}")
    if primary == "thumbs":
        return _by_thumbs(rules, reward, thumbs, look, decision)
    if reward.high < -rules.reward_margin:
        return decision("rollback", f"reward fell by {-reward.estimate:.3f} (interval {_fmt(reward)})")
    if thumbs is not None and thumbs.high < -rules.thumbs_margin:
        return decision("rollback", f"thumbs-up rate fell by {-thumbs.estimate:.3f} (interval {_fmt(thumbs)})")
    if reward.low > -rules.reward_margin:
        return decision("promote", f"reward {reward.estimate:+.3f} (interval {_fmt(reward)}, margin {rules.reward_margin})")
    if look >= rules.looks:
        return decision("rollback", f"not shown as good after {canary.n} answers (reward interval {_fmt(reward)})")
    return decision("wait", f"undecided at look {look} of {rules.looks} (reward interval {_fmt(reward)})")


def _by_thumbs(
    rules: GateRules, reward: Interval, thumbs: Interval | None, look: int, decision: Callable[[Action, str], Decision]
) -> Decision:
    """A thumbs-primary trial past its guardrails of length and KL: the reward is a guardrail at its own wider margin."""
    if reward.high < -rules.guard_reward_margin:
        return decision("rollback", f"reward fell by {-reward.estimate:.3f} (interval {_fmt(reward)}, guardrail "
                        f"{rules.guard_reward_margin})")  # fmt: skip
    if thumbs is None:  # the planned looks are in thumbs, at least min_thumbs: not reached without them
        raise AssertionError("a thumbs look without thumbs")
    if thumbs.high < -rules.thumbs_margin:
        return decision("rollback", f"thumbs-up rate fell by {-thumbs.estimate:.3f} (interval {_fmt(thumbs)})")
    if thumbs.low > -rules.thumbs_margin:
        return decision("promote", f"thumbs-up rate {thumbs.estimate:+.3f} (interval {_fmt(thumbs)}, margin "
                        f"{rules.thumbs_margin}); reward {reward.estimate:+.3f} within its guardrail")  # fmt: skip
    if look >= rules.looks:
        return decision("rollback", f"not shown as good on thumbs (interval {_fmt(thumbs)}, margin {rules.thumbs_margin})")
    return decision("wait", f"undecided at look {look} of {rules.looks} (thumbs-up interval {_fmt(thumbs)})")


def _fmt(interval: Interval) -> str:
    return f"[{interval.low:+.3f}, {interval.high:+.3f}]"
