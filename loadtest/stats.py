"""Figures over benchmark rounds: percentiles of latencies, and means with their 95% interval.

The interval is the project's one ``mean_ci`` (``toyworld.evaluate``: Student's t), written
the way every benchmark's JSON reports it. Knows nothing about what was measured.
"""

from __future__ import annotations

import math
from typing import Any

from toyworld.evaluate import mean_ci


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def over_rounds(values: list[float]) -> dict[str, Any]:
    """``{"mean", "ci95", "rounds"}`` of per-round values (``ci95`` is ``[null, null]`` for a single round)."""
    estimate = mean_ci(values)
    bounds = [round(x, 4) if math.isfinite(x) else None for x in estimate.ci95]
    return {"mean": round(estimate.mean, 4), "ci95": bounds, "rounds": estimate.n}
