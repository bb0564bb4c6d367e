"""One training round on the tiny test models: log → pairs → DPO (real TRL) → registry → pointer.

Also the DPO loss against a hand-computed value, the reference log-prob cache (the
reference is the base policy even when the adapter starts from a parent version), skips
and bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli import assert_one_line_error
from tests.trainer.rounds import logp, pair, write_log
from tests.trainer.test_cli import run_cli
from trainer.__main__ import main
from versioning.registry import Registry

pytestmark = pytest.mark.slow


def test_a_round_registers_a_verified_version_and_moves_the_pointer(deployment: Path, test_models: Path, capsys: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from versioning import probe

    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round trained" in out
    assert "v0001" in out
    registry = Registry(deployment.parent / "registry")
    manifest = registry.verify("policy", "v0001")
    assert manifest.parent is None
    assert manifest.algorithm == "dpo"
    assert manifest.format == "lora"
    assert {"adapter_model.safetensors", "adapter_config.json", "probe.json"} <= set(manifest.files)
    assert manifest.data_window["policy_version"] == "base"
    assert manifest.data_window["rm_version"] == "rm-base"
    assert manifest.data_window["pairs"] == 24
    assert manifest.data_window["thumbs_used"] == 0
    assert manifest.data_window["thumb_share"] == 0.0
    ev = manifest.evaluation
    assert ev["retokenized"] == 0
    assert ev["ref_computed"] == 48
    assert ev["ref_cached"] == 0
    assert ev["loss"] < math.log(2)
    assert ev["reward_margin"] > 0
    assert ev["kl_to_reference"] > 0  # the summed exact next-token KL of a trained adapter
    assert ev["kl_to_reference_stderr"] >= 0
    pointer = registry.pointer("policy", "current")
    assert pointer is not None
    assert pointer.version == "v0001"

    # The stored probe is what the saved adapter computes (the gateway compares vLLM against it).
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(test_models / "policy"), registry.path("policy", "v0001")
    )
    stored = probe.Probe.load(registry.path("policy", "v0001"))
    tokenizer = AutoTokenizer.from_pretrained(test_models / "policy")
    again = probe.compute(model, probe.sequences(tokenizer))
    assert again.prefixes == stored.prefixes
    assert probe.difference(stored.top, again.top) < 1e-5
    with model.disable_adapter():
        base = probe.compute(model, probe.sequences(tokenizer))
    assert probe.difference(stored.top, base.top) > 1e-3  # the adapter changed the weights

    metrics = (deployment.parent / "registry" / "metrics" / "trainer.prom").read_text()
    assert 'trainer_round_outcome{outcome="trained"} 1.0' in metrics
    assert "trainer_round_pairs 24.0" in metrics

    # The next round's window is what v0001 served: nothing yet, so it skips (exit 0) and registers nothing.
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    assert "round skipped" in capsys.readouterr().out
    assert [m.version for m in registry.versions("policy")] == ["v0001"]
    metrics = (deployment.parent / "registry" / "metrics" / "trainer.prom").read_text()
    assert 'trainer_round_outcome{outcome="skipped"} 1.0' in metrics
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(values["trainer_round_last_success_timestamp_seconds"]) == pytest.approx(manifest.created)


def test_a_child_round_starts_from_its_parent_and_keeps_the_base_as_reference(
    deployment: Path, test_models: Path, tokenizer: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer import adapter, dpo
    from trainer.settings import load

    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    settings = load(deployment)
    write_log(settings.store.database_url(), tokenizer, 16, policy_version="v0001", seed=1)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    registry = Registry(settings.trainer.registry_dir)
    child = registry.verify("policy", "v0002")
    assert child.parent == "v0001"
    assert child.data_window["policy_version"] == "v0001"

    # Reference log-probs in the cache are the base model's, not the parent adapter's.
    reference = f"{dpo.reference_id(test_models / 'policy')}-fp32"
    cache = dpo.RefCache(settings.trainer.registry_dir / "cache" / "ref_logps.sqlite", reference)
    base = AutoModelForCausalLM.from_pretrained(test_models / "policy")
    row = dpo.rows([pair(tokenizer, "What is 2 + 3?", "2 + 3 = 5. Glad to help!", "6.")], tokenizer, 256).rows[0]
    cache_key = cache.key(row["prompt_ids"], row["chosen_ids"])
    init = adapter.policy_model(test_models / "policy", registry.path("policy", "v0001"), settings.trainer.adapter)
    import tempfile

    frozen = settings.trainer.dpo.model_copy(update={"learning_rate": 1e-12})
    with tempfile.TemporaryDirectory() as work:
        shared = settings.trainer.adapter
        _, model = dpo.train(init, tokenizer, [row], frozen, shared, Path(work), cache, progress=False, max_steps=1)
    # The adapter started from the parent's weights (and barely moved at this learning rate).
    from peft import get_peft_model_state_dict

    assert init.parent_weights is not None
    trained = get_peft_model_state_dict(model)
    assert set(trained) == set(init.parent_weights)
    assert all(torch.allclose(trained[k], init.parent_weights[k], atol=1e-6) for k in trained)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)
    assert cache.get_many([cache_key])[cache_key] == pytest.approx(logp(base, row["prompt_ids"], row["chosen_ids"]), abs=1e-4)


def test_dpo_loss_matches_a_hand_computed_value(test_models: Path, tokenizer: Any, tmp_path: Path) -> None:
    """First step: -mean log σ(β[(π_c − ref_c) − (π_r − ref_r)]) with the reference values taken from our cache."""
    from transformers import AutoModelForCausalLM

    from trainer import adapter, dpo
    from trainer.settings import AdapterSettings, DpoSettings

    pairs = [pair(tokenizer, f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a * b + 1}.") for a, b in ((2, 3), (4, 5))]
    made = dpo.rows(pairs, tokenizer, 256)
    assert made.retokenized == 0
    assert len(made.rows) == 2
    assert made.rows[0]["chosen_ids"] == pairs[0]["chosen_token_ids"]  # the stored (sampled) ids, not re-tokenised text
    settings, shared = DpoSettings(beta=0.5, batch_size=2, learning_rate=1e-3), AdapterSettings(bf16=False)
    cache = dpo.RefCache(tmp_path / "ref.sqlite", "test-reference")
    planted = {}
    for k, row in enumerate(made.rows):  # a known reference, so the loss is not the trivial ln 2
        planted[cache.key(row["prompt_ids"], row["chosen_ids"])] = -20.0 - k
        planted[cache.key(row["prompt_ids"], row["rejected_ids"])] = -10.0 + k
    cache.put_many(planted)

    base = AutoModelForCausalLM.from_pretrained(test_models / "policy")
    expected = 0.0
    for k, row in enumerate(made.rows):
        chosen = logp(base, row["prompt_ids"], row["chosen_ids"]) - (-20.0 - k)
        rejected = logp(base, row["prompt_ids"], row["rejected_ids"]) - (-10.0 + k)
        expected += -math.log(1 / (1 + math.exp(-settings.beta * (chosen - rejected)))) / len(made.rows)

    init = adapter.policy_model(test_models / "policy", None, shared)  # LoRA B starts at 0: policy == base at step 1
    result, _ = dpo.train(init, tokenizer, made.rows, settings, shared, tmp_path / "work", cache, progress=False, max_steps=1)
    assert result.ref_cached == 4
    assert result.ref_computed == 0
    assert result.loss == pytest.approx(expected, rel=1e-4)


def _skips_registering_nothing(deployment: Path, capsys: Any, *options: str) -> str:
    """Runs a round that must skip (exit 0, no version, no pointer); its output."""
    assert main(["run", "--config", str(deployment), *options, "--quiet"]) == 0
    out: str = capsys.readouterr().out
    assert "round skipped" in out
    registry = Registry(deployment.parent / "registry")
    assert registry.versions("policy") == []
    assert registry.pointer("policy", "current") is None
    return out


def test_too_few_pairs_skip_with_exit_0_and_register_nothing(deployment: Path, capsys: Any) -> None:
    out = _skips_registering_nothing(deployment, capsys, "--min-pairs", "100")
    assert "24 pairs" in out
    assert "min_pairs is 100" in out
    metrics = (deployment.parent / "registry" / "metrics" / "trainer.prom").read_text()
    assert 'trainer_round_outcome{outcome="skipped"} 1.0' in metrics


def test_while_a_canary_is_on_trial_a_round_publishing_canaries_skips(deployment: Path, capsys: Any) -> None:
    registry = Registry(deployment.parent / "registry")

    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(b"w")

    trial = registry.publish("policy", write, format="lora", parent=None)
    registry.set_pointer("policy", "canary", trial.version)
    assert main(["run", "--config", str(deployment), "--publish-to", "canary", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round skipped" in out
    assert "still on trial" in out
    assert [m.version for m in registry.versions("policy")] == [trial.version]


# At 10x the test's learning rate, 3 DPO steps move the policy ~3.5e-3 ± 1.3e-3 nats (exact next-token KL); KL grows with
# the square of the step, so at 1/1000 of that rate it is ~1.7e-9. A budget of 1e-6 sits >1000x from the first and >500x
# from the second: which side of it each try lands on does not depend on the machine's sampling or float noise.
STEP_LR, BUDGET = 5e-3, 1e-6


def _stepped(deployment: Path, **kl_budget: float | None) -> None:
    config = yaml.safe_load(deployment.read_text())
    config["trainer"]["dpo"]["learning_rate"] = STEP_LR
    config["trainer"]["kl_budget"] = {"max_nats": BUDGET, **kl_budget}
    deployment.write_text(yaml.safe_dump(config))


def test_over_the_kl_budget_a_round_trains_again_at_a_smaller_step(deployment: Path) -> None:
    _stepped(deployment, backoff=1e-3, retries=1, aim=None)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    manifest = Registry(deployment.parent / "registry").verify("policy", "v0001")
    first, second = manifest.evaluation["kl_budget_tries"]
    assert first["step_scale"] == 1.0
    assert first["kl_to_reference"] > 100 * BUDGET
    assert second["step_scale"] == pytest.approx(1e-3)
    # under the budget, and far below the first try: KL falls roughly with the step's square (1e-6 here); the bar is a
    # property of the back-off, not of one build of the test models (0.04 -> 4e-8 with today's dependencies)
    assert 0 < second["kl_to_reference"] < BUDGET
    assert second["kl_to_reference"] < first["kl_to_reference"] / 1000
    assert manifest.evaluation["kl_to_reference"] == second["kl_to_reference"]
    assert manifest.evaluation["kl_to_reference_stderr"] == second["kl_to_reference_stderr"] > 0
    assert manifest.hyperparameters["learning_rate"] == pytest.approx(STEP_LR * 1e-3)


def test_over_the_kl_budget_at_every_step_the_round_skips_and_registers_nothing(deployment: Path, capsys: Any) -> None:
    _stepped(deployment, backoff=0.5, retries=1, aim=None)
    out = _skips_registering_nothing(deployment, capsys)
    assert "every try went over the KL budget of 1e-06 nats" in out
    assert " at 1x, " in out
    assert " at 0.5x)" in out


def test_over_the_kl_budget_the_next_step_is_aimed_from_the_kl_measured(deployment: Path) -> None:
    # the first try lands >100x over: halving (backoff 0.5) would not fit, aiming at half the budget does
    _stepped(deployment, backoff=0.5, retries=1, aim=0.5)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    manifest = Registry(deployment.parent / "registry").verify("policy", "v0001")
    first, second = manifest.evaluation["kl_budget_tries"]
    assert first["kl_to_reference"] > 100 * BUDGET
    assert second["step_scale"] == pytest.approx(0.5 * BUDGET / first["kl_to_reference"])
    assert 0 < second["kl_to_reference"] < BUDGET
    assert manifest.hyperparameters["learning_rate"] == pytest.approx(STEP_LR * second["step_scale"])


def test_a_try_far_under_the_kl_budget_is_aimed_again_from_the_two_measured(deployment: Path) -> None:
    # the aimed second try lands orders of magnitude under the budget (KL grows faster than the step); a third is aimed
    # on the line through the two tries' (log step, log KL), and the round keeps it if it fits, else the second
    _stepped(deployment, backoff=0.5, retries=2, aim=0.5, refine_below=0.1)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    manifest = Registry(deployment.parent / "registry").verify("policy", "v0001")
    first, second, third = manifest.evaluation["kl_budget_tries"]
    assert first["kl_to_reference"] > 100 * BUDGET
    assert 0 < second["kl_to_reference"] < 0.1 * BUDGET
    power = math.log(first["kl_to_reference"] / second["kl_to_reference"]) / math.log(1 / second["step_scale"])
    aimed = second["step_scale"] * (0.5 * BUDGET / second["kl_to_reference"]) ** (1 / power)
    assert third["step_scale"] == pytest.approx(min(aimed, 0.5))
    assert third["step_scale"] > 10 * second["step_scale"]
    assert third["kl_to_reference"] > second["kl_to_reference"]
    kept = third if third["kl_to_reference"] <= BUDGET else second
    assert manifest.evaluation["kl_to_reference"] == kept["kl_to_reference"]
    assert manifest.hyperparameters["learning_rate"] == pytest.approx(STEP_LR * kept["step_scale"])


def _second_round(deployment: Path, tokenizer: Any, times: float, **kl_budget: float | None) -> tuple[float, Registry]:
    """Round 1 without a budget (v0001, its KL to the reference measured), then a log of what v0001 served, and round
    2's budget: ``times`` v0001's KL, at a large step."""
    from trainer.settings import load

    settings = load(deployment)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    registry = Registry(settings.trainer.registry_dir)
    parent_kl = float(registry.verify("policy", "v0001").evaluation["kl_to_reference"])
    assert parent_kl > 0
    write_log(settings.store.database_url(), tokenizer, 16, policy_version="v0001", seed=1)
    _stepped(deployment, **kl_budget, max_nats=parent_kl * times)
    return parent_kl, registry


def test_the_next_try_is_aimed_at_the_room_the_parent_left() -> None:
    from trainer.round import _backoff, _no_room
    from trainer.settings import KlBudgetSettings

    budget = KlBudgetSettings(max_nats=1.0, aim=0.5, backoff=0.5, min_room=0.1)
    assert _backoff(budget, 2.0) == _backoff(budget, 2.0, 0.0) == pytest.approx(0.25)  # from the reference
    # run 6's seed 1, round 3: the parent at 0.794 nats, the full step at 1.568; aimed from the reference the next try
    # was 0.319x (1.19 nats, over again); aimed at the room left it is 0.133x (the third try's 0.134x fitted: 0.978)
    assert _backoff(budget, 1.568, 0.794) == pytest.approx(0.5 * 0.206 / 0.774)
    assert _backoff(budget, 1.5, 1.2) == pytest.approx(0.5 / 1.5)  # a parent over the budget: no room to aim at
    assert _backoff(budget.model_copy(update={"aim": None}), 1.5, 0.8) == 0.5
    assert _no_room(budget, "v0003", 0.95) is not None
    assert _no_room(budget, "v0003", 0.9) is None
    assert _no_room(budget.model_copy(update={"min_room": None}), "v0003", 0.99) is None
    assert _no_room(KlBudgetSettings(), "v0003", 5.0) is None  # no budget


def test_a_round_whose_parent_is_within_min_room_of_the_kl_budget_skips_before_training(
    deployment: Path, tokenizer: Any, capsys: Any
) -> None:
    parent_kl, registry = _second_round(deployment, tokenizer, 1 / 0.95, min_room=0.1)  # the parent at 95%
    capsys.readouterr()
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round skipped" in out
    assert f"v0001 is already {parent_kl:.3g} nats from the reference, within trainer.kl_budget.min_room (0.1)" in out
    assert "no room to train" in out
    assert [m.version for m in registry.versions("policy")] == ["v0001"]


def test_a_child_rounds_next_try_is_aimed_at_the_room_its_parent_left(deployment: Path, tokenizer: Any) -> None:
    # round 2 at a large step from a parent at a third of the budget: the first try goes over (~90x the parent's KL
    # here), the second is aimed at half the room left over the way the first went from the parent
    parent_kl, registry = _second_round(deployment, tokenizer, 3.0, min_room=0.1, backoff=0.5, retries=1, aim=0.5,
                                        refine_below=None)  # fmt: skip
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    child = registry.verify("policy", "v0002")
    first, second = child.evaluation["kl_budget_tries"]
    budget = 3.0 * parent_kl
    assert first["kl_to_reference"] > budget
    assert second["step_scale"] == pytest.approx(0.5 * (budget - parent_kl) / (first["kl_to_reference"] - parent_kl))
    assert child.evaluation["kl_to_reference"] == second["kl_to_reference"] <= budget


def test_bad_input_is_one_line(deployment: Path, tmp_path: Path) -> None:
    config = str(deployment)
    assert_one_line_error(run_cli("run", "--config", config, "--algo", "sgd"), "invalid choice", "sgd")
    assert_one_line_error(run_cli("run", "--config", config, "--registry", str(tmp_path / "nowhere")), "no registry at")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    assert_one_line_error(run_cli("run", "--config", config, "--db", f"sqlite:///{garbage}"), "cannot read the log")
    assert_one_line_error(run_cli("run", "--config", config, "--db", f"sqlite:///{tmp_path / 'none.db'}"), "no log database")
    metrics = json.dumps((tmp_path / "registry" / "metrics" / "trainer.prom").read_text())
    assert 'trainer_round_outcome{outcome=\\"failed\\"} 1.0' in metrics
