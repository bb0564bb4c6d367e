"""Two-sample confidence intervals on a difference (a − b), shared by the canary gate, the trainer's
reward-hacking watch and the evaluation that judges the gate.

Knows the normal-approximation intervals at a given z: Welch's on two means (unequal
variances) and the Wald interval on two proportions with the Agresti–Caffo +1/+2
correction (sensible at small counts and rates near 0 or 1). Does not know what the
samples are or what a decision makes of an interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
