"""Two-sample confidence intervals on a difference (a − b), shared by the canary gate, the trainer's
reward-hacking watch and the evaluation that judges the gate.

Knows the normal-approximation intervals at a given z: Welch's on two means (unequal
variances), the Wald interval on two proportions with the Agresti–Caffo +1/+2
correction (sensible at small counts and rates near 0 or 1), and DeLong's interval on a
mean over pairs that share their members (the reward-model refit's check: pairs of
answers, each answer in many pairs, so the answers are the units, not the pairs). Does
not know what the samples are or what a decision makes of an interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import fmean, variance


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @classmethod
    def around(cls, estimate: float, se: float, z: float) -> Interval:
        return cls(estimate, estimate - z * se, estimate + z * se)

    def signed(self) -> str:
        """``+0.012 [-0.003, +0.027]``."""
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def welch(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int, z: float) -> Interval:
    """(mean_a − mean_b) ± z · sqrt(var_a/n_a + var_b/n_b), from each side's mean, sample variance and count."""
    return Interval.around(mean_a - mean_b, math.sqrt(var_a / n_a + var_b / n_b), z)


def welch_samples(a: Sequence[float], b: Sequence[float], z: float) -> Interval:
    """``welch`` from the samples themselves (each needs at least two)."""
    return welch(fmean(a), variance(a), len(a), fmean(b), variance(b), len(b), z)


def two_proportions(hits_a: int, n_a: int, hits_b: int, n_b: int, z: float) -> Interval:
    """(p_a − p_b) with p = (hits + 1) / (n + 2) (Agresti–Caffo) ± z times the Wald standard error at those p."""
    p_a, p_b = (hits_a + 1) / (n_a + 2), (hits_b + 1) / (n_b + 2)
    return Interval.around(p_a - p_b, math.sqrt(p_a * (1 - p_a) / (n_a + 2) + p_b * (1 - p_b) / (n_b + 2)), z)


def crossed(values: Sequence[float], firsts: Sequence[Hashable], seconds: Sequence[Hashable], z: float) -> Interval:
    """The mean of ``values`` (one per pair of a first and a second member) ± z times DeLong's standard error:
    sqrt(s1² / n1 + s2² / n2), where s1² is the sample variance over the n1 distinct first members of their pairs'
    mean value, s2² likewise over the second members. On a full grid of firsts × seconds with a difference of two
    scores' hits as the value, this is DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUCs; on other
    designs, the same structural components. Pairs sharing a member are not independent, so the interval narrows with
    the members, not the pairs: one member on a side leaves it unbounded (no evidence)."""
    if not values:
        return Interval(math.nan, -math.inf, math.inf)
    estimate = fmean(values)
    spread = 0.0
    for keys in (firsts, seconds):
        groups: dict[Hashable, list[float]] = {}
        for key, value in zip(keys, values, strict=True):
            groups.setdefault(key, []).append(value)
        if len(groups) < 2:
            return Interval(estimate, -math.inf, math.inf)
        spread += variance([fmean(g) for g in groups.values()], estimate) / len(groups)
    return Interval.around(estimate, math.sqrt(spread), z)
