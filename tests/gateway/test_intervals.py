"""The shared two-sample intervals (``gateway.intervals``), by hand."""

from __future__ import annotations

import math
import random
from statistics import fmean, stdev

import pytest

from gateway.intervals import Interval, crossed, two_proportions, welch, welch_samples


def test_welch_interval_by_hand() -> None:
    diff = welch_samples([1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0], 1.959964)
    assert diff.estimate == pytest.approx(2.0 - 0.5)
    half = 1.959964 * (1.0 / 3 + (1 / 3) / 4) ** 0.5  # sample variances 1 and 1/3
    assert (diff.low, diff.high) == pytest.approx((1.5 - half, 1.5 + half))
    assert welch(2.0, 1.0, 3, 0.5, 1 / 3, 4, 1.959964) == diff


def test_two_proportions_uses_the_plus_one_plus_two_correction() -> None:
    diff = two_proportions(8, 10, 0, 0, 2.0)  # no data on one side: p = 1/2 there, not 0/0
    p_a, p_b = 9 / 12, 1 / 2
    assert diff.estimate == pytest.approx(p_a - p_b)
    half = 2.0 * (p_a * (1 - p_a) / 12 + p_b * (1 - p_b) / 2) ** 0.5
    assert (diff.low, diff.high) == pytest.approx((diff.estimate - half, diff.estimate + half))


def test_an_interval_prints_signed_and_is_centred() -> None:
    interval = Interval.around(0.012, 0.01, 1.5)
    assert interval.signed() == "+0.012 [-0.003, +0.027]"
    assert interval.high - interval.estimate == pytest.approx(interval.estimate - interval.low)


def test_crossed_interval_by_hand() -> None:
    """A 2 x 2 grid: the first members' mean values are 0.5 and 1, the second members' 1 and 0.5, around 0.75."""
    diff = crossed([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"], ["x", "y", "x", "y"], 1.0)
    assert diff.estimate == pytest.approx(0.75)
    half = (0.125 / 2 + 0.125 / 2) ** 0.5  # each side: ((-0.25)^2 + 0.25^2) / 1, over 2 members
    assert (diff.low, diff.high) == pytest.approx((0.75 - half, 0.75 + half))
    # The same pairs twice over: as many members, so the same interval (pairs are not the units)
    assert crossed([1.0, 0.0, 1.0, 1.0] * 2, ["a", "a", "b", "b"] * 2, ["x", "y", "x", "y"] * 2, 1.0) == diff


def test_one_member_on_a_side_is_no_evidence() -> None:
    sixteen_ups_one_down = crossed([1.0] * 15 + [0.0], list(range(16)), ["down"] * 16, 1.96)
    assert sixteen_ups_one_down.estimate == pytest.approx(15 / 16)
    assert (sixteen_ups_one_down.low, sixteen_ups_one_down.high) == (-math.inf, math.inf)
    empty = crossed([], [], [], 1.96)
    assert math.isnan(empty.estimate)
    assert (empty.low, empty.high) == (-math.inf, math.inf)


def _null_trial(rng: random.Random, ups: int, downs: int) -> tuple[list[float], list[int], list[int]]:
    """Two scorers of the same quality (quality plus unit noise each) on ``ups`` answers better than ``downs`` by one
    standard deviation: per up x down pair, the second scorer's hit minus the first's. Their true AUCs are equal."""
    up, down = [rng.gauss(1.0, 1.0) for _ in range(ups)], [rng.gauss(0.0, 1.0) for _ in range(downs)]
    first = ([q + rng.gauss(0, 1) for q in up], [q + rng.gauss(0, 1) for q in down])
    second = ([q + rng.gauss(0, 1) for q in up], [q + rng.gauss(0, 1) for q in down])
    values, firsts, seconds = [], [], []
    for i in range(ups):
        for j in range(downs):
            values.append(float(second[0][i] > second[1][j]) - float(first[0][i] > first[1][j]))
            firsts.append(i)
            seconds.append(j)
    return values, firsts, seconds


def test_crossed_covers_a_null_difference_at_its_level_and_pairs_as_units_do_not() -> None:
    """400 seeded trials of 40 ups x 10 downs (measured: the 90% interval covered the true 0 in 87% of them; an interval
    that counts the 400 pairs as independent, in 35%). Deterministic: one seed, pure Python."""
    rng = random.Random(7)
    z = 1.6448536  # 90% two-sided
    covered = naive = 0
    for _ in range(400):
        values, firsts, seconds = _null_trial(rng, 40, 10)
        interval = crossed(values, firsts, seconds, z)
        covered += interval.low <= 0.0 <= interval.high
        naive += abs(fmean(values)) <= z * stdev(values) / math.sqrt(len(values))
    assert 0.84 <= covered / 400 <= 0.95
    assert naive / 400 < 0.6
