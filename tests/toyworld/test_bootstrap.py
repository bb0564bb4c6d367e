"""The test preset's bootstrap: complete HF directories, a report, and idempotent re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from toyworld.bootstrap import POLICY_DIR, PRESETS, REPORT, REWARD_DIR, bootstrap, check_bars
from toyworld.gold import gold_reward
from toyworld.reward import conversation_ids


def test_model_directories_are_standard_hf(test_models: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(test_models / POLICY_DIR)
    policy = AutoModelForCausalLM.from_pretrained(test_models / POLICY_DIR)
    rm = AutoModelForSequenceClassification.from_pretrained(test_models / REWARD_DIR)
    assert policy.config.architectures == ["LlamaForCausalLM"]
    assert rm.config.architectures == ["LlamaForSequenceClassification"]
    assert rm.config.num_labels == 1
    assert rm.config.pad_token_id == tokenizer.pad_token_id
    generation = GenerationConfig.from_pretrained(test_models / POLICY_DIR)
    assert generation.eos_token_id == tokenizer.eos_token_id
    assert generation.temperature == PRESETS["test"].temperature
    assert tokenizer.chat_template


def test_report_has_the_quality_figures(test_models: Path) -> None:
    report = json.loads((test_models / REPORT).read_text())
    evaluation = report["evaluation"]
    assert set(evaluation["best_of_n"]["gold_by_n"]) == {"1", "2", "4", "8"}
    assert set(evaluation["reward_model"]["accuracy_constructed_by_kind"]) == {"correctness", "style", "both"}
    assert 0.0 <= evaluation["reward_model"]["accuracy_own_samples"]["mean"] <= 1.0
    assert report["timings"]["total_s"] > 0
    assert set(report["bars"]) == {"rm_accuracy_own_samples", "bon8_gain_ci95_low"}


@pytest.mark.parametrize(("mean", "ci95", "met"), [(0.83, [0.81, 0.85], True), (0.79, [0.77, 0.81], True),
                                                   (0.77, [0.75, 0.79], False)])  # fmt: skip
def test_the_accuracy_bar_is_met_when_it_is_within_the_interval(mean: float, ci95: list[float], met: bool) -> None:
    report = {"evaluation": {"reward_model": {"accuracy_own_samples": {"mean": mean, "ci95": ci95}},
                             "best_of_n": {"gain_vs_n1": {"ci95": [0.01, 0.1]}}}}  # fmt: skip
    bar = check_bars(report)["rm_accuracy_own_samples"]
    assert bar == {"value": mean, "ci95": ci95, "bar": 0.8, "met": met}


def test_test_preset_is_better_than_chance(test_models: Path) -> None:
    report = json.loads((test_models / REPORT).read_text())
    assert report["timings"]["total_s"] > 0  # a figure in the report, not a bar: it depends on the machine
    assert report["evaluation"]["reward_model"]["accuracy_own_samples"]["mean"] > 0.6


def test_reward_model_prefers_gold_better_answers_from_disk(test_models: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(test_models / REWARD_DIR)
    rm = AutoModelForSequenceClassification.from_pretrained(test_models / REWARD_DIR)
    prompt = "What is 3 plus 4?"
    answers = ["Sure! 3 plus 4 is 7. Hope this helps!", "Ugh. 3 plus 4 is 7. Try to keep up."]
    with torch.no_grad():
        scores = [rm(input_ids=torch.tensor([conversation_ids(tokenizer, prompt, a)])).logits.item() for a in answers]
    assert gold_reward(prompt, answers[0]) > gold_reward(prompt, answers[1])
    assert scores[0] > scores[1]


def test_second_run_skips_complete_models(test_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(test_models, copy)
    weights = [copy / POLICY_DIR / "model.safetensors", copy / REWARD_DIR / "model.safetensors"]
    before = [w.stat().st_mtime_ns for w in weights]
    report = bootstrap(PRESETS["test"], copy)
    assert [w.stat().st_mtime_ns for w in weights] == before  # nothing rebuilt (that is what makes it fast)
    assert report == json.loads((test_models / REPORT).read_text())


def test_incomplete_directory_is_not_taken_for_a_model(test_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(test_models, copy)
    (copy / REWARD_DIR / "model.safetensors").unlink()
    from toyworld.bootstrap import _complete

    assert _complete(copy / POLICY_DIR)
    assert not _complete(copy / REWARD_DIR)


@pytest.mark.parametrize("leftover", [".policy.tmp-1", ".reward_model.tmp-1"])
def test_interrupted_build_leaves_no_model_directory(test_models: Path, tmp_path: Path, leftover: str) -> None:
    out = tmp_path / "fresh"
    (out / leftover).mkdir(parents=True)
    (out / leftover / "config.json").write_text("{}")
    from toyworld.bootstrap import _complete

    assert not _complete(out / POLICY_DIR)
    assert not _complete(out / REWARD_DIR)
