"""The ``swap`` and ``soak`` benchmarks' arithmetic on made-up samples (the benchmarks themselves need the default
models and minutes of real vLLM: they are run by hand, their figures are in the README)."""

from __future__ import annotations

import argparse

import pytest

from loadtest import soak, swap


def test_swap_windows_are_judged_against_the_steady_requests_between_them() -> None:
    load = swap.Load()
    for i in range(200):  # steady: 100 ms each, one slow request of 300 ms
        load.done.append((float(i), 0.3 if i == 50 else 0.1, 200, "base"))
    for i in range(20):  # the swap window: 400 ms each, one 502
        load.done.append((1000.0 + i, 0.4, 502 if i == 3 else 200, "v1"))
    windows = [{"kind": kind, "round": 0, "start": 1000.0, "end": 1019.0, "version": "v1"} for kind in swap.CHANGES]
    report = swap._report(load, windows, argparse.Namespace(rounds=1, concurrency=4, n=4))
    assert report["non_2xx"] == 1
    assert report["statuses"] == {"200": 219, "502": 1}
    assert report["steady_p99_ms"] == pytest.approx(100.0, abs=1.0)  # the 99th percentile of 200, not the one outlier
    assert report["changes"]["swap"]["p99_over_steady"]["mean"] == pytest.approx(4.0, rel=0.02)
    assert report["changes"]["swap"]["requests"] == [20]
    assert [g["met"] for g in report["goals"]] == [False, False, False, False]


def test_soak_growth_compares_the_first_and_last_thirds_after_warm_up() -> None:
    samples = [{"t_s": float(t), "rss_mb": 100.0 + (5.0 if t >= 6 else 0.0), "fds": 30.0} for t in range(9)]
    samples[7]["rss_mb"] = 500.0  # one sample taken mid-batch does not decide: medians
    assert soak._thirds(samples, "rss_mb") == (100.0, 105.0)
    assert soak._thirds(samples, "fds") == (30.0, 30.0)
    assert soak._thirds(samples[:2], "rss_mb") == (100.0, 100.0)  # at least one sample each


def test_soak_mixes_valid_and_invalid_requests() -> None:
    bodies = {kind: soak._body(kind, 7) for kind in soak.KINDS}
    assert bodies["n4_stream"]["stream"] is True
    assert bodies["n4"]["n_candidates"] == 4
    assert bodies["n1"]["n_candidates"] == 1
    assert bodies["invalid"]["temperature"] == "hot"
    assert "stream" not in bodies["n1"]
