"""A quick evaluate-loop on the test preset: one short round per arm through a real gateway and vLLM.

Checks the report's fields (the JSON on the last line and report.json), that the plot is
written, that the answers the loop trained on came through the gateway and its log, and that
the gold reward is out of the serving and training paths' reach: the loop starts the gateway
and the rounds through ``toyworld.loop.sealed``, under which importing the gold module fails
(shown here on the bootstrap, which does read gold), so the rounds that trained prove that
training never needed it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import assert_one_line_error
from tests.toyworld.test_cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_sealed_process_cannot_import_the_gold_reward(tmp_path: Path) -> None:
    sealed = subprocess.run(
        [sys.executable, "-m", "toyworld.loop.sealed", "toyworld", "bootstrap", "--preset", "test", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sealed.returncode != 0
    assert "toyworld.gold" in sealed.stderr
    assert "ImportError" in sealed.stderr or "ModuleNotFoundError" in sealed.stderr


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("evaluate-loop", "--arms", "rm,magic"), "unknown arm", "magic")
    assert_one_line_error(run_cli("evaluate-loop", "--thumb-rate", "0.5"), "at most 20%")
    assert_one_line_error(run_cli("evaluate-loop", "--rounds", "0"), "must be positive")
    assert_one_line_error(run_cli("evaluate-loop", "--arms", "rm", "--set", "thumbs:trainer.min_pairs=8"), "not one of")


def test_one_short_round_per_arm(policy_vllm: str, test_models: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_alias": "toy-bon",
                "managed_vllm": {"model_dir": str(test_models / "policy"), "served_name": "policy"},
                "scorer": {"model_dir": str(test_models / "reward_model"), "threads": 1},
                "n_candidates": 4,
                "trainer": {
                    "base_policy": str(test_models / "policy"),
                    "base_reward_model": str(test_models / "reward_model"),
                    "min_pairs": 8,
                    "adapter": {"lora_r": 8, "lora_alpha": 16},
                    "dpo": {"epochs": 1, "batch_size": 8},
                    "evaluation": {"prompts": 4, "max_new_tokens": 12},
                },
            }
        )
    )
    out = tmp_path / "loop"
    done = subprocess.run(
        [
            sys.executable, "-m", "toyworld", "evaluate-loop", "--config", str(config), "--rounds", "1", "--seeds", "1",
            "--arms", "rm,thumbs,grpo", "--thumb-rate", "0.2", "--prompts-per-round", "48", "--heldout", "12", "--samples", "4",
            "--max-tokens", "24", "--concurrency", "4", "--vllm", policy_vllm, "--out", str(out),
            "--canary-fraction", "0.5", "--gate-min-requests", "16",
            # the rm arm's gateway chooses N per request (two requests of a task kind at the cap, then the spread rule)
            "--set", "rm:adaptive.enabled=true", "--set", "rm:adaptive.min_requests=2", "--set", "rm:adaptive.explore=0",
        ],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "report.json").read_text())
    assert (out / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [arm["arm"] for arm in result["arms"]] == ["rm", "thumbs", "grpo"]
    for arm in result["arms"]:
        assert arm["seeds"] == [0]
        assert set(arm["start_bon_gold"]) == {"1", "2", "4"}  # 4 samples per prompt: best-of-N up to 4
        assert 0.0 <= arm["start_bon_gold"]["1"] <= 1.0
        assert arm["thumb_rate"] == (0.0 if arm["arm"] == "rm" else 0.2)
        [first] = arm["rounds"]
        assert set(first) >= {"round", "n1_gold", "n1_gold_ci95", "bon_gold", "rm_score", "kl_to_start", "mean_len",
                              "pairs_used", "policy_version"}  # fmt: skip
        # trained, put on trial for half the users, then promoted (served and measured) or refused by the gate
        [action] = first["gate"]
        assert action in ("promote", "rollback")
        assert first["policy_version"] == ("v0001" if action == "promote" else "base")
        assert first["pairs_used"] >= 8
        # the summed exact next-token KL: positive for a trained version, exactly 0 for the base
        assert (first["kl_to_start"] > 0) == (action == "promote")
        assert first["kl_to_start_stderr"] >= 0
        low, high = first["n1_gold_ci95"]
        assert low <= first["n1_gold"] <= high
        assert arm["final_n1_gold"] == first["n1_gold"]
        assert "final_n1_vs_start_bon4" in arm["goals"]
        assert isinstance(arm["warnings"], list)
        [seed] = arm["per_seed"]
        assert seed["rounds"][0]["answers"] >= 48 + 2 * 16  # the round's prompts, then the trial's until the first look
        assert seed["rounds"][0]["failed"] == 0
        assert seed["rounds"][0]["gate"]["canary"] == "v0001"
        assert seed["rounds"][0]["gate"]["primary"] in ("reward", "thumbs")
        # the decision judged after the fact against the gold of what each arm served during the trial
        judged = seed["rounds"][0]["gate"]["gold"]
        assert judged["canary_answers"] >= 16
        assert judged["current_answers"] >= 16
        assert judged["gold_diff"][1] <= judged["gold_diff"][0] <= judged["gold_diff"][2]
        assert arm["gate_vs_gold"]["trials"] == 1
        if arm["arm"] == "rm":
            assert first["thumbs_used"] == 0
        assert 0.0 <= first["rm_accuracy"] <= 1.0
    thumbs = result["arms"][1]["per_seed"][0]["rounds"][0]
    answers = thumbs["answers"]
    assert 0 < thumbs["thumbs_up"] + thumbs["thumbs_down"] <= 0.2 * answers + 3 * (0.2 * 0.8 * answers) ** 0.5
    rm_only = result["arms"][0]["per_seed"][0]["rounds"][0]
    assert rm_only["thumbs_up"] + rm_only["thumbs_down"] == 0
    # what the traffic was served: candidates per request (the compute dividend) and the gold of the answers
    for arm in result["arms"]:
        seed = arm["per_seed"][0]["rounds"][0]
        assert 0.0 <= seed["served_gold"] <= 1.0
        assert seed["served_gold_ci95"][0] <= seed["served_gold"] <= seed["served_gold_ci95"][1]
        assert arm["rounds"][0]["candidates_per_request"] == seed["candidates_per_request"]
        if arm["arm"] != "rm":  # adaptive N off: every request at the configured 4, and no rule named
            assert (seed["candidates_per_request"], seed["adaptive"]) == (4.0, {})
    # adaptive N on: every request says which rule chose its N; the user declared its task kinds (six of them, so at
    # least 12 requests ran cold at the cap), the spread rule decided the rest of the round, within [1, 4], and during
    # the canary's trial (its first look at 16 answers per arm) it was held at the configured 4 for both arms
    adaptive = rm_only["adaptive"]
    assert sum(adaptive.values()) == rm_only["answers"]
    assert set(adaptive) <= {"cold", "spread", "trial"}
    assert adaptive["cold"] >= 12
    assert adaptive.get("spread", 0) > 0
    assert adaptive.get("trial", 0) >= 16
    assert 1.0 <= rm_only["candidates_per_request"] <= 4.0
    # the grpo arm trained on the served groups: vLLM's logged log-probs agree with the trainer's before any update
    grpo = json.loads((out / "grpo-seed0" / "registry" / "policy" / "versions" / "v0001" / "manifest.json").read_text())
    assert grpo["algorithm"] == "grpo"
    assert grpo["evaluation"]["groups"] >= 8
    assert abs(grpo["evaluation"]["first_ratio"] - 1) < 0.05
    # the loop starts every gateway and round through toyworld.loop.sealed: these trained with gold unimportable
    for run in ("rm-seed0", "thumbs-seed0", "grpo-seed0"):
        assert (out / run / "registry" / "policy" / "versions" / "v0001" / "manifest.json").is_file()
        assert (out / run / "registry" / "policy" / "gate.jsonl").is_file()
