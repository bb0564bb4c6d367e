"""KTO and PPO rounds on the tiny test models (real TRL): each runs a few steps, registers a version
that differs from the base, and records its algorithm; KTO's rows come from thumbs and pair sides."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.store.records import FeedbackRecord
from gateway.store.sql import SqlStore
from tests.trainer.rounds import logp, pair, tokens, write_log
from trainer.__main__ import main
from trainer.export import window
from trainer.pairs import build
from versioning import watch as state
from versioning.registry import Registry

pytestmark = pytest.mark.slow


def _thumbs(url: str, thumbs: dict[str, str]) -> None:
    store = SqlStore(url)
    store.write([FeedbackRecord(cid, "k", thumb, None, time.time()) for cid, thumb in thumbs.items()])  # type: ignore[arg-type]
    store.close()


def _configure(path: Path, **trainer: Any) -> None:
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(config))


def _probe_moved(registry: Registry, version: str, base_dir: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from versioning import probe

    stored = probe.Probe.load(registry.path("policy", version))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), registry.path("policy", version))
    with model.disable_adapter():
        base = probe.compute(model, probe.sequences(AutoTokenizer.from_pretrained(base_dir)))
    return probe.difference(stored.top, base.top)


def test_kto_rows_come_from_thumbs_and_pair_sides(tokenizer: Any) -> None:
    from trainer import kto

    example = pair(tokenizer, "What is 2 + 3?", "2 + 3 = 5.", "6.")
    thumb_down = {
        "prompt": example["prompt"], "completion": example["chosen"], "label": False, "token_ids": example["chosen_token_ids"],
    }  # fmt: skip
    made = kto.rows([thumb_down], [example], tokenizer, 256, seed=0)
    by_answer = {tuple(r["completion_ids"]): r["label"] for r in made.rows}
    # The thumb's label wins over the pair side with the same answer; the rejected side is undesirable.
    assert by_answer == {tuple(example["chosen_token_ids"]): False, tuple(example["rejected_token_ids"]): False}
    assert (made.desirable, made.undesirable, made.from_thumbs, made.retokenized) == (0, 2, 1, 0)
    no_ids = {**thumb_down, "token_ids": None, "label": True, "completion": [{"role": "assistant", "content": "five"}]}
    again = kto.rows([no_ids], [], tokenizer, 256, seed=0)
    assert again.retokenized == 1
    assert again.rows[0]["completion_ids"] == tokens(tokenizer, "five")


def test_a_kto_round_trains_on_thumbs_and_pairs(deployment: Path, test_models: Path, tokenizer: Any, capsys: Any) -> None:
    config = yaml.safe_load(deployment.read_text())
    url = config["store"]["url"]
    _thumbs(url, {f"c-base-{i}": "down" if i % 3 == 0 else "up" for i in range(12)})
    _configure(deployment, kto={"epochs": 1, "batch_size": 8, "learning_rate": 1e-3})
    assert main(["run", "--config", str(deployment), "--algo", "kto", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round trained" in out
    assert "kto version v0001" in out
    registry = Registry(deployment.parent / "registry")
    manifest = registry.verify("policy", "v0001")
    assert manifest.algorithm == "kto"
    ev = manifest.evaluation
    # 24 prompts, each with a right and a wrong answer: 48 distinct rows. 12 served (right) answers are thumbed,
    # 4 of them down: those 4 are undesirable (the thumb's label wins over the pair side) and their pairs, thumbs
    # overriding, make the wrong answer chosen, so desirable. The 20 other wrong answers are undesirable.
    assert ev["from_thumbs"] == 12
    assert ev["desirable"] + ev["undesirable"] == manifest.data_window["rows"] == 48
    assert ev["undesirable"] == 4 + 20
    assert ev["steps"] == 6
    assert math.isfinite(ev["loss"])
    assert ev["kl_to_reference"] >= 0
    assert math.isfinite(ev["kl_to_reference"])
    assert _probe_moved(registry, "v0001", test_models / "policy") > 1e-3


def test_a_ppo_round_optimises_the_reward_model_with_a_kl_penalty(deployment: Path, test_models: Path, capsys: Any) -> None:
    _configure(
        deployment,
        base_reward_model=str(test_models / "reward_model"),
        ppo={"steps": 3, "prompts_per_step": 2, "generations": 2, "max_new_tokens": 12, "learning_rate": 1e-3, "beta": 0.05},
    )
    assert main(["run", "--config", str(deployment), "--algo", "ppo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ppo version v0001" in out
    registry = Registry(deployment.parent / "registry")
    manifest = registry.verify("policy", "v0001")
    assert manifest.algorithm == "ppo"
    assert manifest.hyperparameters["implementation"] == "trl.GRPOTrainer"
    assert manifest.hyperparameters["reward_model"] == "rm-base"
    assert manifest.data_window["rows"] == 24  # distinct prompts
    ev = manifest.evaluation
    assert ev["steps"] == 3
    assert math.isfinite(ev["reward"])
    assert ev["kl"] >= 0
    assert _probe_moved(registry, "v0001", test_models / "policy") > 1e-4


def test_ppo_without_a_reward_model_is_one_line(deployment: Path, tmp_path: Path) -> None:
    from tests.cli import assert_one_line_error
    from tests.trainer.test_cli import run_cli

    _configure(deployment, base_reward_model=str(tmp_path / "nowhere"))
    assert_one_line_error(run_cli("run", "--config", str(deployment), "--algo", "ppo"), "no reward model at")


def test_kto_skips_under_min_pairs(deployment: Path, capsys: Any) -> None:
    _configure(deployment, kto={"from_pairs": False})
    assert main(["run", "--config", str(deployment), "--algo", "kto", "--quiet"]) == 0
    assert "0 KTO rows" in capsys.readouterr().out
    assert Registry(deployment.parent / "registry").versions("policy") == []


def _base_prefers_polite(test_models: Path, tokenizer: Any) -> bool:
    """Whether the test preset's reward model, as this machine built it, ranks the right, polite answers above the short
    wrong ones on these questions. Builds differ (each machine trains the models, and CPUs round floats differently):
    on one, these tests' base agreement with users who like the polite answers was 0.0, on another 1.0. So each test
    makes its users like the style this build's reward model ranks lower, and the refit must learn the users' side."""
    from trainer import reward

    model, rm_tokenizer = reward.load(test_models / "reward_model")
    probe = [pair(tokenizer, f"What is {a} + {b}?", f"{a} + {b} = {a + b}. Glad to help!", f"{a + b + 1}.")
             for a in range(1, 13) for b in (1, 5, 9)]  # fmt: skip
    return reward.agreement(model, rm_tokenizer, probe, 256) > 0.5


def test_a_reward_model_refit_learns_the_thumbs_and_becomes_current(
    deployment: Path, test_models: Path, tokenizer: Any, capsys: Any
) -> None:
    """Every served answer is the right, polite one. Users thumb it up where the base reward model ranks it below the
    short wrong one, and down where it ranks it above (``_base_prefers_polite``): either way the base model disagrees
    with the thumbs (checked below), and the refit reward model must come to agree with them."""
    config = yaml.safe_load(deployment.read_text())
    thumb = "down" if _base_prefers_polite(test_models, tokenizer) else "up"
    _thumbs(config["store"]["url"], {f"c-base-{i}": thumb for i in range(24)})
    _configure(
        deployment,
        base_reward_model=str(test_models / "reward_model"),
        reward={"pairs": "thumb_vs_candidates", "min_pairs": 8, "learning_rate": 1e-3, "epochs": 3, "batch_size": 8},
    )
    assert main(["run", "--config", str(deployment), "--refit-reward-model", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reward model v0001 registered and set as current (was rm-base)" in out
    assert "thumb_vs_candidates pairs" in out
    registry = Registry(deployment.parent / "registry")
    manifest = registry.verify("reward_model", "v0001")
    assert manifest.format == "full"
    assert manifest.algorithm == "bradley-terry"
    ev = manifest.evaluation
    assert ev["train_pairs"] + ev["held_out_pairs"] == 24
    assert ev["held_out_pairs"] >= 1
    assert ev["agreement_before_train"] < 0.5
    assert ev["agreement_after_train"] > ev["agreement_before_train"]
    assert ev["agreement_after_held_out"] > ev["agreement_before_held_out"]
    assert ev["held_out_change_low"] > 0  # made current on evidence over the held-out answers
    pointer = registry.pointer("reward_model", "current")
    assert pointer is not None
    assert pointer.version == "v0001"
    metrics = (deployment.parent / "registry" / "metrics" / "reward_refit.prom").read_text()
    assert 'trainer_reward_refit_outcome{outcome="trained"} 1.0' in metrics
    assert "trainer_reward_refit_held_out_change_high " in metrics  # the bound no_loss judges by
    assert not (deployment.parent / "registry" / "metrics" / "trainer.prom").exists()  # the policy round's own file

    # The next policy round's window is what the new reward model scored (nothing yet) plus thumbed completions.
    assert main(["run", "--config", str(deployment), "--quiet", "--min-pairs", "100"]) == 0
    assert "scored by v0001" in capsys.readouterr().out


def test_a_refit_without_enough_thumbs_skips(deployment: Path, capsys: Any) -> None:
    assert main(["run", "--config", str(deployment), "--refit-reward-model", "--quiet"]) == 0
    assert "0 thumb-vs-thumb pairs" in capsys.readouterr().out
    assert Registry(deployment.parent / "registry").versions("reward_model") == []


def _served_and_thumbed(url: str, tokenizer: Any, n: int, liked_polite: bool) -> None:
    """``n`` requests, each with a right polite answer and a short wrong one: the even ones served the liked answer (the
    polite one if ``liked_polite``) and were thumbed up, the odd ones served the other and were thumbed down."""
    from gateway.store.records import CandidateRecord, CompletionRecord

    records: list[Any] = []
    for i in range(n):
        a, b = 1 + i % 12, 1 + (i * 5) % 12
        good, bad = f"{a} + {b} = {a + b}. Glad to help!", f"{a + b + 1}."
        liked, disliked = (good, bad) if liked_polite else (bad, good)
        cands = [CandidateRecord(0, liked, tokens(tokenizer, liked), "stop", 0.0, chosen=i % 2 == 0),
                 CandidateRecord(1, disliked, tokens(tokenizer, disliked), "stop", 1.0, chosen=i % 2 == 1)]  # fmt: skip
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
        records.append(CompletionRecord(f"t{i}", time.time(), "k", messages, {}, "base", "rm-base", 2, 9, 9, {}, cands))
        records.append(FeedbackRecord(f"t{i}", "k", "up" if i % 2 == 0 else "down", None, time.time()))
    store = SqlStore(url)
    store.write(records)
    store.close()


def test_a_refit_on_thumb_vs_thumb_pairs_learns_what_users_judged(
    deployment: Path, test_models: Path, tokenizer: Any, capsys: Any
) -> None:
    from trainer import reward

    config = yaml.safe_load(deployment.read_text())
    liked_polite = not _base_prefers_polite(test_models, tokenizer)  # users like what the base reward model ranks lower
    _served_and_thumbed(config["store"]["url"], tokenizer, 60, liked_polite)
    _configure(deployment, base_reward_model=str(test_models / "reward_model"),
               reward={"min_pairs": 8, "learning_rate": 1e-3, "epochs": 2, "batch_size": 16, "max_pairs": 200})  # fmt: skip
    store = SqlStore(config["store"]["url"])
    data = reward.thumb_pairs(window(store, 0.0, None), every=5, every_down=2, max_pairs=200, seed=0)
    store.close()
    # no answer is on both sides of the split, and every pair is an answer thumbed up against one thumbed down
    train_ids = {i for p in data.train for i in p["completion_id"].split("|")}
    held_ids = {i for p in data.held_out for i in p["completion_id"].split("|")}
    assert train_ids.isdisjoint(held_ids)
    assert all(p["chosen"][0]["content"].endswith("Glad to help!") == liked_polite for p in data.train + data.held_out)
    assert len(data.train) == 200  # 25 x 12 up x down combinations, 200 drawn
    assert len(data.held_out) == 5 * 18  # every held-out up against every held-out down (the ids' hashes decide)
    root = deployment.parent / "registry"
    state.write(root, state.WatchState(firing=True, version="v0003", reasons=["agreement: fell"]))  # as a round would
    assert main(["run", "--config", str(deployment), "--refit-reward-model", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "thumb_vs_thumb pairs" in out
    assert "registered and set as current" in out
    assert "the reward-hacking watch is cleared" in out
    cleared = state.read(root)
    assert (cleared.firing, cleared.cleared_by, cleared.cleared_for) == (False, "refit v0001", "v0003")
    ev = Registry(deployment.parent / "registry").verify("reward_model", "v0001").evaluation
    assert ev["pair_kind"] == "thumb_vs_thumb"
    assert ev["agreement_before_held_out"] < 0.5  # the base reward model prefers the style users dislike
    assert ev["agreement_after_held_out"] > 0.9
    assert (ev["held_out_chosen"], ev["held_out_rejected"]) == (5, 18)
    assert ev["held_out_change_low"] > 0  # the check's evidence: an interval over the 23 held-out answers

    # The same thumbs again, asking for more held-out answers than there are: registered, not made current.
    _configure(deployment, base_reward_model=str(test_models / "reward_model"),
               reward={"min_pairs": 8, "learning_rate": 1e-3, "epochs": 2, "batch_size": 16, "max_pairs": 200,
                       "min_held_out": 6})  # fmt: skip
    assert main(["run", "--config", str(deployment), "--refit-reward-model", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reward model v0002 registered but not made current" in out
    assert "too few held-out answers to judge (5 on the chosen side, 18 on the rejected" in out
    registry = Registry(deployment.parent / "registry")
    assert registry.verify("reward_model", "v0002").parent == "v0001"
    pointer = registry.pointer("reward_model", "current")
    assert pointer is not None
    assert pointer.version == "v0001"


def test_a_full_fine_tune_continues_a_lora_parent_and_keeps_the_base_as_reference(
    deployment: Path, test_models: Path, tokenizer: Any, capsys: Any
) -> None:
    from transformers import AutoModelForCausalLM

    from trainer import dpo
    from trainer.settings import load

    assert main(["run", "--config", str(deployment), "--quiet"]) == 0  # v0001: a LoRA adapter
    settings = load(deployment)
    write_log(settings.store.database_url(), tokenizer, 16, policy_version="v0001", seed=1)
    _configure(deployment, format="full")
    assert main(["run", "--config", str(deployment), "--quiet"]) == 0
    registry = Registry(deployment.parent / "registry")
    manifest = registry.verify("policy", "v0002")
    assert manifest.format == "full"
    assert manifest.parent == "v0001"
    assert {"model.safetensors", "config.json", "tokenizer.json", "probe.json"} <= set(manifest.files)
    ev = manifest.evaluation
    assert ev["ref_computed"] + ev["ref_cached"] == 2 * manifest.data_window["rows"]  # pairs seen in v0001's round: cached
    assert manifest.evaluation["kl_to_reference"] >= 0
    assert math.isfinite(manifest.evaluation["kl_to_reference"])

    # The saved model is a model of its own (vLLM serves the directory) and its probe is what it computes.
    from transformers import AutoTokenizer

    from versioning import probe

    served = AutoModelForCausalLM.from_pretrained(registry.path("policy", "v0002"))
    stored = probe.Probe.load(registry.path("policy", "v0002"))
    again = probe.compute(served, probe.sequences(AutoTokenizer.from_pretrained(registry.path("policy", "v0002"))))
    assert probe.difference(stored.top, again.top) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(test_models / "policy")
    assert probe.difference(stored.top, probe.compute(base, probe.sequences(tokenizer)).top) > 1e-3

    # The reference of the full round is the base, not the merged parent: its cached log-probs are the base's.
    reference = f"{dpo.reference_id(test_models / 'policy')}-fp32"
    cache = dpo.RefCache(settings.trainer.registry_dir / "cache" / "ref_logps.sqlite", reference)
    store = SqlStore(settings.store.database_url())
    child_window = list(window(store, 0, None, "v0001", "rm-base"))
    store.close()
    row = dpo.rows(build(child_window, settings.trainer.pairs).pairs, tokenizer, 256).rows[0]
    key = cache.key(row["prompt_ids"], row["rejected_ids"])
    assert cache.get_many([key])[key] == pytest.approx(logp(base, row["prompt_ids"], row["rejected_ids"]), abs=1e-4)
    # A later LoRA round cannot continue a full version: one line, nothing registered.
    _configure(deployment, format="lora")
    write_log(settings.store.database_url(), tokenizer, 16, policy_version="v0002", seed=2)
    assert main(["run", "--config", str(deployment), "--quiet"]) == 1
    assert "is a full fine-tune" in capsys.readouterr().err
