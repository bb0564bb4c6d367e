"""The one mean-with-interval helper the loop's report and the benchmarks share."""

from __future__ import annotations

import math

import pytest

from toyworld.evaluate import mean_ci, t975


@pytest.mark.parametrize(("df", "exact"), [(1, 12.7062), (5, 2.5706), (30, 2.0423), (31, 2.0395), (60, 2.0003), (1000, 1.9623)])
def test_t_quantiles_match_published_values(df: int, exact: float) -> None:
    assert t975(df) == pytest.approx(exact, abs=3e-4)


def test_a_few_rounds_get_a_t_interval_and_one_value_an_unbounded_one() -> None:
    estimate = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width 4.3027 / sqrt(3)
    assert estimate.mean == 2.0
    assert estimate.ci95 == pytest.approx((2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3)))
    assert mean_ci([5.0]).ci95 == (-math.inf, math.inf)
