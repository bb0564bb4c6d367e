"""``bench workers`` end to end (mock backend, gateways with 1 and 2 workers): the report's shape, and the CPU of the
2-worker gateway counted over its whole process tree."""

from __future__ import annotations

import json
import math

import pytest

from loadtest import bench

pytestmark = pytest.mark.slow


def test_the_report_compares_one_and_two_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["workers", "--rounds", "2", "--requests", "60", "--concurrency", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "workers"
    [row] = report["results"]
    assert row["concurrency"] == 4
    for arm in ("workers_1", "workers_2"):
        assert row[arm][f"{arm}_rps"] > 0
        # a gateway request costs well over 100 us of CPU; the parent alone (workers not counted) spends ~0
        assert row[arm]["cpu_us_per_request"]["mean"] > 100
    assert row["rps_ratio_2_over_1"]["rounds"] == 2
    assert math.isfinite(row["rps_ratio_2_over_1"]["mean"])
