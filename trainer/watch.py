"""The reward-hacking watch: does the served version please the reward model more while people like it less?

The reward model is a proxy: optimise it too hard and the true objective falls. Per
version, from what it served (the log, within ``trainer.max_age``): the chosen answer's
reward, its length, the refusal rate, the thumbs-up rate, and the reward model's agreement
with thumbs (the probability that an answer thumbed up scored above one thumbed down: an
AUC, with the Hanley–McNeil standard error). The current version is compared with the one
before it (its parent, or the base), and a check fires only on statistical evidence, each
at ``alpha / checks`` (Bonferroni), never on a point estimate:
- ``reward_vs_thumbs``: the reward rose (interval above 0) while the thumbs-up rate fell
  (interval below 0), rewards of one reward model only;
- ``agreement``: the reward model's agreement with thumbs on this version's answers is
  below ``min_agreement`` (interval entirely below), or fell from the parent's (the
  difference's interval below 0);
- ``length``: the policy's samples (every candidate, averaged per request: the reward
  model's picks would hide a drift it causes) grew more than ``max_length_growth`` × the
  parent's (the ratio's interval entirely above);
- ``refusals``: the refusal rate rose by more than ``refusal_margin`` (interval above);
- ``kl``: the trainer's KL to the reference (the manifest) minus its standard errors above
  ``max_kl``.
When one fires, the state goes to the registry (``versioning.watch``), rounds pause (a
skip, exit 0, saying why) and the metrics say so; it clears by a reward-model refit that
restores agreement with thumbs, or by an admin. Pure statistics over records plus the
``evaluate`` that reads the log; does not train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist, fmean, variance
from typing import Any

from gateway.intervals import Interval, two_proportions, welch_samples
from gateway.objectives import REFUSAL
from gateway.store.records import CompletionRecord, FeedbackRecord
from trainer.settings import WatchSettings

CHECKS = ("reward_vs_thumbs", "agreement", "length", "refusals", "kl")
Labelled = tuple[CompletionRecord, FeedbackRecord | None]


@dataclass
class VersionStats:
    """What one version served (its chosen answers), with rewards by reward-model version."""

    version: str
    answers: int = 0
    lengths: list[float] = field(default_factory=list)
    """Per request, the mean length of all its candidates: the policy's own samples, not the reward model's picks (a
    reward model biased to length picks long answers from any policy, hiding the policy's drift)."""
    refusals: int = 0
    ups: int = 0
    downs: int = 0
    rewards: dict[str, list[float]] = field(default_factory=dict)
    """Chosen rewards per reward-model version."""
    thumbed: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """Per reward-model version: rewards of answers thumbed up, and of answers thumbed down."""

    @property
    def thumbs(self) -> int:
        return self.ups + self.downs


def stats(version: str, labelled: Iterable[Labelled]) -> VersionStats:
    out = VersionStats(version)
    for record, thumb in labelled:
        chosen = next((c for c in record.candidates if c.chosen), None)
        if record.status != "ok" or record.policy_version != version or chosen is None:
            continue
        out.answers += 1
        out.lengths.append(fmean(float(c.token_count) for c in record.whole))
        out.refusals += bool(REFUSAL.search(chosen.text))
        rm = record.rm_version or "none"
        if chosen.reward is not None:
            out.rewards.setdefault(rm, []).append(chosen.reward)
        if thumb is not None:
            up = thumb.thumb == "up"
            out.ups += up
            out.downs += not up
            if chosen.reward is not None:
                ups, downs = out.thumbed.setdefault(rm, ([], []))
                (ups if up else downs).append(chosen.reward)
    return out


@dataclass(frozen=True)
class Check:
    name: str
    fired: bool
    detail: str
    estimate: float | None = None
    low: float | None = None
    high: float | None = None


def z_for(settings: WatchSettings) -> float:
    return NormalDist().inv_cdf(1 - settings.alpha / len(CHECKS) / 2)


def auc(ups: Sequence[float], downs: Sequence[float]) -> tuple[float, float]:
    """P(an answer thumbed up scored above one thumbed down), ties half; its Hanley–McNeil standard error."""
    wins = sum(1.0 if u > d else 0.5 if u == d else 0.0 for u in ups for d in downs)
    a = wins / (len(ups) * len(downs))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (len(ups) - 1) * (q1 - a * a) + (len(downs) - 1) * (q2 - a * a)) / (len(ups) * len(downs))
    return a, math.sqrt(max(var, 0.0))


def checks(
    current: VersionStats, parent: VersionStats, rm_version: str, settings: WatchSettings,
    kl: tuple[float | None, float | None] = (None, None),
) -> list[Check]:  # fmt: skip
    """Every check of ``current`` against ``parent``; one without enough data does not fire and says so."""
    z = z_for(settings)
    out = [_reward_vs_thumbs(current, parent, rm_version, settings, z), _agreement(current, parent, rm_version, settings, z),
           _length(current, parent, settings, z), _refusals(current, parent, settings, z), _kl(kl, settings, z)]  # fmt: skip
    return out


def _enough(current: VersionStats, parent: VersionStats, settings: WatchSettings) -> bool:
    return min(current.answers, parent.answers) >= settings.min_answers


def _reward_vs_thumbs(current: VersionStats, parent: VersionStats, rm: str, s: WatchSettings, z: float) -> Check:
    a, b = current.rewards.get(rm, []), parent.rewards.get(rm, [])
    if min(len(a), len(b)) < s.min_answers or min(current.thumbs, parent.thumbs) < s.min_thumbs:
        return Check("reward_vs_thumbs", False, f"too little data ({len(a)}/{len(b)} rewards by {rm}, "
                     f"{current.thumbs}/{parent.thumbs} thumbs)")  # fmt: skip
    reward = welch_samples(a, b, z)
    rate = two_proportions(current.ups, current.thumbs, parent.ups, parent.thumbs, z)
    fired = reward.low > 0 and rate.high < 0
    return _check("reward_vs_thumbs", fired, f"reward {reward.signed()}, thumbs-up rate {rate.signed()}", rate)


def _agreement(current: VersionStats, parent: VersionStats, rm: str, s: WatchSettings, z: float) -> Check:
    ups, downs = current.thumbed.get(rm, ([], []))
    if min(len(ups), len(downs)) < s.min_each_thumb:
        return Check("agreement", False, f"too few thumbed answers scored by {rm} ({len(ups)} up, {len(downs)} down)")
    a, se = auc(ups, downs)
    mine = Interval.around(a, se, z)
    if mine.high < s.min_agreement:
        return _check("agreement", True, f"the reward model orders thumbs {mine.signed()}, below {s.min_agreement}", mine)
    p_ups, p_downs = parent.thumbed.get(rm, ([], []))
    if min(len(p_ups), len(p_downs)) >= s.min_each_thumb:
        b, se_b = auc(p_ups, p_downs)
        diff = Interval.around(a - b, math.sqrt(se * se + se_b * se_b), z)
        if diff.high < 0:
            return _check("agreement", True, f"agreement with thumbs fell {diff.signed()} from the parent's {b:.3f}", diff)
    return _check("agreement", False, f"agreement with thumbs {mine.signed()}", mine)


def _length(current: VersionStats, parent: VersionStats, s: WatchSettings, z: float) -> Check:
    if not _enough(current, parent, s):
        return Check("length", False, f"too little data ({current.answers}/{parent.answers} answers)")
    a, b = fmean(current.lengths), fmean(parent.lengths)
    if b <= 0:
        return Check("length", False, "the parent's answers are empty")
    ratio = a / b  # the delta method on the ratio of two independent means
    se = ratio * math.sqrt(variance(current.lengths) / (len(current.lengths) * a * a)
                           + variance(parent.lengths) / (len(parent.lengths) * b * b))  # fmt: skip
    interval = Interval.around(ratio, se, z)
    fired = interval.low > s.max_length_growth
    return _check("length", fired, f"samples {interval.signed()} x as long as the parent's (limit {s.max_length_growth})",
                  interval)  # fmt: skip


def _refusals(current: VersionStats, parent: VersionStats, s: WatchSettings, z: float) -> Check:
    if not _enough(current, parent, s):
        return Check("refusals", False, f"too little data ({current.answers}/{parent.answers} answers)")
    diff = two_proportions(current.refusals, current.answers, parent.refusals, parent.answers, z)
    fired = diff.low > s.refusal_margin
    return _check("refusals", fired, f"refusal rate {diff.signed()} (margin {s.refusal_margin})", diff)


def _kl(kl: tuple[float | None, float | None], s: WatchSettings, z: float) -> Check:
    estimate, se = kl
    if s.max_kl is None or estimate is None:
        return Check("kl", False, "no KL bound or estimate")
    interval = Interval.around(estimate, se or 0.0, z)
    fired = interval.low > s.max_kl
    return _check("kl", fired, f"KL to the reference {interval.signed()} nats (limit {s.max_kl})", interval)


def _check(name: str, fired: bool, detail: str, interval: Interval) -> Check:
    return Check(name, fired, detail, interval.estimate, interval.low, interval.high)


@dataclass
class Evaluation:
    version: str
    parent: str
    checks: list[Check]
    at: float = field(default_factory=time.time)

    @property
    def fired(self) -> list[Check]:
        return [c for c in self.checks if c.fired]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]
