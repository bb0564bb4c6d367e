"""``bench scoring`` end to end on the test preset's reward model: the report's shape and that both arms scored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest import bench, scoring

pytestmark = pytest.mark.slow


def test_the_report_has_each_n_with_its_ratio(test_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scoring", "--models", str(test_models), "--n", "2", "4", "--rounds", "2", "--reps", "1", "--device", "cpu"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "scoring"
    assert report["device"] == "cpu"
    assert set(report["results"]) == {"2", "4"}
    for row in report["results"].values():
        assert row["batch_ms"] > 0
        assert row["singles_ms"] > 0
        assert row["ratio"]["rounds"] == 2
        assert math.isfinite(row["ratio"]["mean"])


def test_the_candidates_are_one_prompt_s_answers() -> None:
    convs = scoring.conversations(8, seed=3)
    assert len(convs) == 8
    assert len({json.dumps(c.messages) for c in convs}) == 1
    assert len({c.answer for c in convs}) > 1  # styles and faults drawn per candidate
    assert scoring.conversations(8, seed=3) == convs  # the same per seed, so every arm scores the same texts
