"""The shared two-sample intervals (``gateway.intervals``), by hand."""

from __future__ import annotations

import pytest

from gateway.intervals import Interval, two_proportions, welch, welch_samples


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
