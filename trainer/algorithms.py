"""One interface for the policy algorithms a round can run: a table from name to its config and a ``fit`` of one shape.

Each ``fit`` takes the round's settings, the registry, the reward-model version the window
was scored by, the initial model (``trainer.adapter.PolicyInit``), the tokenizer, the
window's data and a work directory, and returns what it trained (``Fitted``). The round
(``trainer.round``) chooses from ``TABLE`` by name and never branches on the algorithm.
The configs are pydantic models in ``trainer.settings`` (the YAML edge; importing them must
not import torch or TRL); every algorithm also reads the shared ``trainer.adapter``.
Knows how each algorithm's rows are made from the window and which hyper-parameters its
manifest records; the training itself is in ``trainer.dpo``, ``trainer.kto``,
``trainer.ppo`` and ``trainer.grpo``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trainer.adapter import Trained
from trainer.groups import Group
from trainer.pairs import weighted
from trainer.settings import DpoSettings, GrpoSettings, KtoSettings, PpoSettings, TrainerSettings
from versioning.registry import Registry


@dataclass
class RoundData:
    """What the window gives each algorithm: pairs (DPO, KTO), thumbed answers (KTO), prompts (PPO, evaluation),
    served groups (GRPO)."""

    pairs: list[dict[str, Any]]
    thumbed: list[dict[str, Any]]
    prompts: list[list[dict[str, Any]]]
    groups: list[Group] = field(default_factory=list)

    def size(self, algorithm: str, kto_from_pairs: bool) -> tuple[int, str]:
        if algorithm == "kto":
            return len(self.thumbed) + (2 * len(self.pairs) if kto_from_pairs else 0), "KTO rows (thumbs and pair sides)"
        if algorithm == "ppo":
            return len({repr(p) for p in self.prompts}), "distinct prompts"
        if algorithm == "grpo":
            return len(self.groups), "groups (served requests with 2+ scored samples and their log-probs)"
        return len(self.pairs), "pairs"


@dataclass
class Fitted:
    trained: Trained
    """What training reports (steps, seconds, loss, the algorithm's figures, history)."""
    model: Any
    """The trained model (a peft model; for a full fine-tune, the whole model)."""
    rows: int
    """Rows (pairs, KTO rows, prompts) it trained on."""
    hyperparameters: dict[str, Any]
    """What the version's manifest records."""


Fit = Callable[[TrainerSettings, Registry, str, Any, Any, RoundData, Path, bool], Fitted]


def fit_dpo(settings: TrainerSettings, registry: Registry, rm_version: str, init: Any, tokenizer: Any, data: RoundData,
            work: Path, progress: bool) -> Fitted:  # fmt: skip
    from trainer import dpo

    s = settings.trainer
    made = dpo.rows(weighted(data.pairs, s.pairs.thumb_weight), tokenizer, s.adapter.max_length)
    reference = f"{dpo.reference_id(s.base_policy)}-{'bf16' if s.adapter.bf16 else 'fp32'}"
    cache = dpo.RefCache(s.registry_dir / "cache" / "ref_logps.sqlite", reference)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun)
    result, model = dpo.train(init, tokenizer, made.rows, s.dpo, s.adapter, work, cache if s.dpo.cache_reference else None,
                              progress=progress, processes=processes)  # fmt: skip
    figures = {
        "reward_margin": result.reward_margin, "reward_accuracy": result.reward_accuracy, "ref_cached": result.ref_cached,
        "ref_computed": result.ref_computed, "retokenized": made.retokenized, "truncated": made.truncated,
    }  # fmt: skip
    trained = Trained(result.steps, result.seconds, result.loss, figures, result.history)
    hyperparameters = {**s.dpo.model_dump(), **s.adapter.model_dump(), "processes": processes}
    return Fitted(trained, model, len(made.rows), hyperparameters)


def fit_kto(settings: TrainerSettings, registry: Registry, rm_version: str, init: Any, tokenizer: Any, data: RoundData,
            work: Path, progress: bool) -> Fitted:  # fmt: skip
    from trainer import kto

    s = settings.trainer
    made = kto.rows(data.thumbed, data.pairs if s.kto.from_pairs else [], tokenizer, s.adapter.max_length, s.adapter.seed)
    trained, model = kto.train(init, tokenizer, made.rows, s.kto, s.adapter, work, progress=progress)
    trained.figures.update(desirable=made.desirable, undesirable=made.undesirable, from_thumbs=made.from_thumbs,
                           retokenized=made.retokenized, truncated=made.truncated)  # fmt: skip
    return Fitted(trained, model, len(made.rows), {**s.kto.model_dump(), **s.adapter.model_dump()})


def fit_ppo(settings: TrainerSettings, registry: Registry, rm_version: str, init: Any, tokenizer: Any, data: RoundData,
            work: Path, progress: bool) -> Fitted:  # fmt: skip
    from trainer import ppo

    s = settings.trainer
    rm_dir = registry.path("reward_model", rm_version) if rm_version != s.base_rm_version else s.base_reward_model
    if rm_version != s.base_rm_version:
        registry.verify("reward_model", rm_version)
    prompts = list({repr(p): p for p in data.prompts}.values())
    trained, model = ppo.train(init, tokenizer, prompts, ppo.RewardModel(rm_dir), s.ppo, s.adapter, work, progress=progress)
    shared = s.adapter.model_dump(exclude={"max_length"})  # PPO's answers are cut by max_new_tokens
    params = {**s.ppo.model_dump(), **shared, "implementation": ppo.IMPLEMENTATION, "reward_model": rm_version}
    return Fitted(trained, model, len(prompts), params)


def fit_grpo(settings: TrainerSettings, registry: Registry, rm_version: str, init: Any, tokenizer: Any, data: RoundData,
             work: Path, progress: bool) -> Fitted:  # fmt: skip
    from trainer import grpo
    from trainer.round import RoundError

    s = settings.trainer
    made = grpo.samples(data.groups, tokenizer, s.grpo, s.adapter.max_length)
    if not made.rows:
        raise RoundError(f"no sample of the {len(data.groups)} groups has an advantage and fits trainer.adapter.max_length "
                         f"({made.truncated} cut)")  # fmt: skip
    trained, model = grpo.train(init, tokenizer, made.rows, s.grpo, s.adapter, work, progress=progress)
    thumbed = sum(g.thumb is not None for g in data.groups)
    trained.figures.update(groups=len(data.groups), samples=len(made.rows), truncated=made.truncated,
                           zero_advantage=made.zero_advantage, thumbed_groups=thumbed)  # fmt: skip
    shared = s.adapter.model_dump()
    return Fitted(trained, model, len(made.rows), {**s.grpo.model_dump(), **shared, "implementation": grpo.IMPLEMENTATION})


@dataclass(frozen=True)
class Algorithm:
    """An algorithm's config (its ``trainer.<name>`` section; every one also reads ``trainer.adapter``) and its fit,
    paired as TRL pairs ``XxxConfig`` with ``XxxTrainer``."""

    config: type[BaseModel]
    fit: Fit


TABLE: dict[str, Algorithm] = {
    "dpo": Algorithm(DpoSettings, fit_dpo),
    "kto": Algorithm(KtoSettings, fit_kto),
    "ppo": Algorithm(PpoSettings, fit_ppo),
    "grpo": Algorithm(GrpoSettings, fit_grpo),
}
ALGORITHMS = tuple(TABLE)
DISTRIBUTED = ("dpo",)
"""The algorithms a round may run on several processes (``accelerate launch``, data parallel): tested with two."""
