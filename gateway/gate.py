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
from one reward model. Does not know where the totals come from or what a decision does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

Action = Literal["promote", "rollback", "wait"]


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


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    look: int
    reward_diff: Interval | None = None
    up_rate_diff: Interval | None = None
    length_ratio: float | None = None


def look_number(canary_n: int, rules: GateRules) -> int:
    """Which look ``canary_n`` answers reach: 0 before ``min_requests``, then 1 at 1×, 2 at 2×, 3 at 4×, ..."""
    if canary_n < rules.min_requests:
        return 0
    return min(rules.looks, 1 + int(math.log2(canary_n / rules.min_requests)))


def reward_interval(current: ArmTotals, canary: ArmTotals, z: float) -> Interval:
    """Welch: (canary − current) mean reward ± z · sqrt(s²/n + s²/n)."""
    diff = canary.reward_mean - current.reward_mean
    half = z * math.sqrt(canary.reward_var / canary.n + current.reward_var / current.n)
    return Interval(diff, diff - half, diff + half)


def up_rate_interval(current: ArmTotals, canary: ArmTotals, z: float) -> Interval:
    """Wald interval on the difference of two proportions (canary − current), with a +1/+2 (Agresti–Caffo) correction."""
    p1 = (canary.thumbs_up + 1) / (canary.thumbs + 2)
    p0 = (current.thumbs_up + 1) / (current.thumbs + 2)
    half = z * math.sqrt(p1 * (1 - p1) / (canary.thumbs + 2) + p0 * (1 - p0) / (current.thumbs + 2))
    diff = p1 - p0
    return Interval(diff, diff - half, diff + half)


def decide(
    current: ArmTotals, canary: ArmTotals, rules: GateRules, canary_kl: float | None = None, canary_kl_stderr: float | None = None
) -> Decision:
    """``canary_kl``: the canary's KL to the starting policy (the trainer's estimate, never negative) and its standard
    error, shown in the reason; the guardrail compares the estimate with ``max_kl``."""
    look = look_number(canary.n, rules)
    if look == 0 or current.n < rules.min_requests:
        return Decision("wait", f"too little data: canary {canary.n}, current {current.n} answers (need {rules.min_requests})", 0)
    z = NormalDist().inv_cdf(1 - rules.alpha / rules.looks / 2)
    ratio = canary.length_mean / current.length_mean if current.length_mean > 0 else math.inf
    reward = reward_interval(current, canary, z)
    thumbs = up_rate_interval(current, canary, z) if min(current.thumbs, canary.thumbs) >= rules.min_thumbs else None

    def decision(action: Action, reason: str) -> Decision:
        return Decision(action, reason, look, reward, thumbs, ratio)

    if ratio > rules.max_length_ratio:
        return decision("rollback", f"answers grew {ratio:.2f}x longer (limit {rules.max_length_ratio}x)")
    if rules.max_kl is not None and canary_kl is not None and canary_kl > rules.max_kl:
        error = "" if canary_kl_stderr is None else f" ± {canary_kl_stderr:.2f}"
        return decision("rollback", f"KL to the starting policy {canary_kl:.2f}{error} nats exceeds {rules.max_kl}")
    if reward.high < -rules.reward_margin:
        return decision("rollback", f"reward fell by {-reward.estimate:.3f} (interval {_fmt(reward)})")
    if thumbs is not None and thumbs.high < -rules.thumbs_margin:
        return decision("rollback", f"thumbs-up rate fell by {-thumbs.estimate:.3f} (interval {_fmt(thumbs)})")
    if reward.low > -rules.reward_margin:
        return decision("promote", f"reward {reward.estimate:+.3f} (interval {_fmt(reward)}, margin {rules.reward_margin})")
    if look >= rules.looks:
        return decision("rollback", f"not shown as good after {canary.n} answers (reward interval {_fmt(reward)})")
    return decision("wait", f"undecided at look {look} of {rules.looks} (reward interval {_fmt(reward)})")


def _fmt(interval: Interval) -> str:
    return f"[{interval.low:+.3f}, {interval.high:+.3f}]"
