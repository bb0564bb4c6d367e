"""A run on disk (``toyworld.loop.records``) and reports rebuilt from runs of several invocations (``loop-report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, run_module
from toyworld.evaluate import Estimate, mean_ci
from toyworld.loop import records
from toyworld.loop.measure import Measurement
from toyworld.loop.report import RoundRecord, Run, arm_report
from toyworld.loop.user import Traffic


def measurement(n1: list[float], version: str = "base") -> Measurement:
    per = {1: n1, 2: [x + 0.05 for x in n1], 4: [x + 0.1 for x in n1]}
    return Measurement(version, "rm-base", mean_ci(n1), {n: sum(v) / len(v) for n, v in per.items()}, 0.4, 0.1, 9.0, n1,
                       per, kl_to_start_stderr=0.01, per_prompt_rm=[0.4] * len(n1), per_prompt_len=[9.0] * len(n1),
                       rm_accuracy=Estimate(0.8, (0.7, 0.9), 12))  # fmt: skip


def run(arm: str, seed: int, rounds: int) -> Run:
    start = measurement([0.5, 0.6, 0.7])
    made = Run(arm, seed, 0.2, start)
    for k in range(1, rounds + 1):
        traffic = Traffic(sent=40, thumbs_up=6, thumbs_down=2, versions={"base": 20, f"v000{k}": 20})
        gate = {"action": "promote", "primary": "thumbs", "gold": {"canary_answers": 20, "current_answers": 20,
                "gold_diff": [0.05, 0.01, 0.09], "significant": True, "agrees": True}}  # fmt: skip
        made.rounds.append(RoundRecord(k, measurement([0.5 + 0.05 * k, 0.6, 0.7 + 0.01 * k], f"v000{k}"), f"v000{k}", 30,
                                       "trained", traffic, {"outcome": "refit"}, {"train": 1.5}, gate, 8,
                                       {"firing": False}))  # fmt: skip
    return made


def test_a_run_comes_back_as_it_was_saved_and_reports_alike(tmp_path: Path) -> None:
    original = run("thumbs", 3, 2)
    original.start.n1_gold = Estimate(0.6, (0.5, math.inf), 1)  # one prompt: an unbounded interval survives the trip
    records.save(original, tmp_path)
    back = records.load(tmp_path)
    assert back == original
    assert back.start.per_prompt_bon[4] == original.start.per_prompt_bon[4]  # integer keys again, not strings
    assert not list(tmp_path.glob("*.tmp"))
    original.start.n1_gold = back.start.n1_gold = mean_ci(original.start.per_prompt_n1)
    assert json.dumps(arm_report([back])) == json.dumps(arm_report([original]))


def test_loop_report_joins_invocations_and_cuts_an_arm_to_its_common_rounds(tmp_path: Path) -> None:
    for where, made in (("a/thumbs-seed0", run("thumbs", 0, 3)), ("b/thumbs-seed1", run("thumbs", 1, 2)),
                        ("b/rm-seed1", run("rm", 1, 3))):  # fmt: skip
        (tmp_path / where).mkdir(parents=True)
        records.save(made, tmp_path / where)
    done = run_module("toyworld", "loop-report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    by_arm = {arm["arm"]: arm for arm in report["arms"]}
    assert by_arm["thumbs"]["seeds"] == [0, 1]
    assert len(by_arm["thumbs"]["rounds"]) == 2  # seed 1 stopped after round 2
    assert len(by_arm["rm"]["rounds"]) == 3
    assert report["rounds_per_arm"] == {"thumbs": 2, "rm": 3}
    [versus] = report["between_arms"]
    assert versus["arms"] == ["rm", "thumbs"]  # in ARMS' order, whatever order the directories were found in
    assert versus["seeds"] == [1]  # the one seed both arms ran
    assert [r["round"] for r in versus["rounds"]] == [1, 2]
    assert "thumbs - rm (N=1 gold, paired; start, then by round):" in done.stdout
    assert by_arm["thumbs"]["gate_vs_gold"]["agree"] == 4
    assert (tmp_path / "r" / "loop.png").stat().st_size > 0
    (tmp_path / "c" / "thumbs-seed0").mkdir(parents=True)
    records.save(run("thumbs", 0, 1), tmp_path / "c" / "thumbs-seed0")
    twice = run_module("toyworld", "loop-report", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "r"))
    assert_one_line_error(twice, "thumbs seed 0 is in both")


@pytest.mark.parametrize("text", ["3", "0,2", "4,"])
def test_seeds_are_a_count_or_a_list(text: str) -> None:
    from toyworld.__main__ import _seeds

    assert _seeds(text) == {"3": (0, 1, 2), "0,2": (0, 2), "4,": (4,)}[text]
