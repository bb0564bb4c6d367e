"""Honest figures for the bootstrap report, measured against the hidden gold reward.

Knows the statistics: reward-model pairwise accuracy (on the policy's own samples, with a
bootstrap interval over prompts; on constructed pairs by type), best-of-N gold by N from
disjoint groups of samples, and the paired best-of-8 minus N=1 difference with its 95%
interval. Takes samples and scores as plain lists; does no sampling or scoring itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from statistics import fmean, stdev

MIN_GOLD_GAP = 0.05
"""Pairs whose gold rewards differ by less than this count as ties and are not scored."""


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci95: tuple[float, float]
    n: int

    def as_dict(self) -> dict[str, object]:
        return {"mean": round(self.mean, 4), "ci95": [round(x, 4) for x in self.ci95], "n": self.n}


T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604, 2.1448,
         2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484,
         2.0452, 2.0423)  # fmt: skip
"""Student's t 97.5% quantiles for 1..30 degrees of freedom."""


def t975(df: int) -> float:
    """Student's t 97.5% quantile: the table up to 30 degrees of freedom, a Cornish–Fisher expansion beyond
    (within 2e-4 of the exact value there; 1.96 in the limit)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean with a 95% t-interval (what a handful of benchmark rounds needs; ≈ normal for hundreds of prompts);
    fewer than two values: an unbounded interval."""
    m = fmean(values)
    half = t975(len(values) - 1) * stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")
    return Estimate(m, (m - half, m + half), len(values))


def _pair_hits(golds: Sequence[float], rewards: Sequence[float], min_gap: float) -> list[float]:
    hits = []
    for i, j in combinations(range(len(golds)), 2):
        gap = golds[i] - golds[j]
        if abs(gap) < min_gap:
            continue
        diff = rewards[i] - rewards[j]
        hits.append(0.5 if diff == 0 else float((diff > 0) == (gap > 0)))
    return hits


def own_sample_accuracy(
    golds: Sequence[Sequence[float]],
    rewards: Sequence[Sequence[float]],
    seed: int,
    min_gap: float = MIN_GOLD_GAP,
    resamples: int = 1000,
) -> Estimate:
    """Pairwise accuracy over all pairs of each prompt's samples; bootstrap CI over prompts."""
    per_prompt = [_pair_hits(g, r, min_gap) for g, r in zip(golds, rewards, strict=True)]
    per_prompt = [h for h in per_prompt if h]
    total = sum(len(h) for h in per_prompt)
    point = sum(sum(h) for h in per_prompt) / total
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        draw = [per_prompt[rng.randrange(len(per_prompt))] for _ in per_prompt]
        stats.append(sum(sum(h) for h in draw) / sum(len(h) for h in draw))
    stats.sort()
    return Estimate(point, (stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]), total)


def proportion(hits: Sequence[float]) -> Estimate:
    """A proportion with its Wilson 95% interval."""
    n = len(hits)
    p = sum(hits) / n
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, (centre - half, centre + half), n)


def best_of_n(golds: Sequence[Sequence[float]], rewards: Sequence[Sequence[float]], n: int) -> list[float]:
    """Per prompt, mean gold of the reward-model pick in disjoint groups of ``n`` samples."""
    out = []
    for g, r in zip(golds, rewards, strict=True):
        picks = []
        for start in range(0, len(g) - n + 1, n):
            group = range(start, start + n)
            best = max(group, key=lambda i: r[i])
            picks.append(g[best])
        out.append(fmean(picks))
    return out


@dataclass(frozen=True)
class BestOfN:
    by_n: dict[int, Estimate]
    gain_max_vs_1: Estimate
    """Paired per prompt: best-of-max(N) minus N=1."""
    oracle: Estimate

    def as_dict(self) -> dict[str, object]:
        return {
            "gold_by_n": {str(n): e.as_dict() for n, e in self.by_n.items()},
            "gain_vs_n1": self.gain_max_vs_1.as_dict(),
            "oracle_gold": self.oracle.as_dict(),
        }


def best_of_n_curve(golds: Sequence[Sequence[float]], rewards: Sequence[Sequence[float]], ns: Sequence[int]) -> BestOfN:
    curves = {n: best_of_n(golds, rewards, n) for n in ns}
    top = max(ns)
    gains = [b - a for a, b in zip(curves[1], curves[top], strict=True)]
    return BestOfN({n: mean_ci(v) for n, v in curves.items()}, mean_ci(gains), mean_ci([max(g) for g in golds]))


def rounded(d: object) -> object:
    """Dataclasses and floats made JSON-friendly (4 decimals)."""
    if hasattr(d, "__dataclass_fields__"):
        return rounded(asdict(d))  # type: ignore[call-overload]
    if isinstance(d, dict):
        return {str(k): rounded(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [rounded(v) for v in d]
    if isinstance(d, float):
        return round(d, 4)
    return d


def golds(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """The gold reward of each answer to its prompt: what a benchmark outside the toy world's floor measures its
    answers by (``loadtest.prune``), without importing the gold reward itself."""
    from toyworld.gold import gold_reward

    return [gold_reward(p, a) for p, a in zip(prompts, answers, strict=True)]
