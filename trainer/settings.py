"""The trainer's one settings class: the same YAML as the gateway, with ``TRAINER_*`` overrides.

The trainer reads the gateway's config file (one file describes one deployment): the
``store`` section says where the log is, and the ``trainer`` section holds the trainer's
own knobs. Every other gateway key is ignored here. ``TRAINER_STORE__URL=...`` or
``TRAINER_TRAINER__PAIRS__MIN_MARGIN=0.5`` override the file (``__`` nests).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.settings import ConfigError, StoreSettings, YamlSettings, read_yaml


class PairSettings(BaseModel):
    """How logged candidates become preference pairs (see ``trainer.pairs``)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["best_vs_worst", "best_vs_each"] = "best_vs_worst"
    min_margin: float = Field(default=0.0, ge=0.0, description="smallest reward gap kept as a pair (ties never are)")
    thumbs_override: bool = True
    """A thumb decides the pair whatever the reward model said (and waives ``min_margin``)."""
    from_reward_model: bool = True
    """Pairs from completions nobody thumbed, ordered by the reward model alone. Off: thumbed completions only
    (when the reward model no longer tells right from wrong on the policy's own answers)."""
    max_thumbs_per_key: int | None = Field(default=None, ge=1)
    """Feedback poisoning: at most this many thumbed completions of one API key decide pairs (or KTO rows) in a
    round, the first in the window; the rest of that key's completions count as unthumbed. None: no cap (one key
    is everyone, as in the toy world's loop)."""
    thumb_weight: int = Field(default=1, ge=1, le=16)
    """DPO trains on each thumb-decided pair this many times (TRL's DPO has no per-row weight; repeating a row
    is the same gradient). Thumbs are few but come from people; the reward model's own pairs are many but noisy."""


class AdapterSettings(BaseModel):
    """What every algorithm's round shares: the LoRA adapter's shape, the training precision, the seed and the
    length cut (``trainer.adapter``). A version continues its parent's adapter, so its shape is read here only for
    the first version."""

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(default=16, ge=1, description="must not exceed the serving vLLM's --max-lora-rank")
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bf16: bool = True
    """bf16 autocast for the forward passes (TRL's default; DPO's reference cache holds values computed the same way)."""
    seed: int = 0
    max_length: int = Field(default=256, ge=8, description="prompt + answer tokens (DPO, KTO); longer rows are cut at the end")


ADAPTER_KEYS = tuple(AdapterSettings.model_fields)


class DpoSettings(BaseModel):
    """One DPO round (``trainer.dpo``, TRL's DPOTrainer): the base (adapter off) as the reference."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0)
    learning_rate: float = Field(default=5e-4, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=16, ge=1)
    cache_reference: bool = True
    """Reference log-probs computed once per pair and kept in ``<registry>/cache`` (the reference is fixed)."""


class KtoSettings(BaseModel):
    """A KTO round: unpaired desirable/undesirable answers; the base (adapter off) as the reference."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0)
    learning_rate: float = Field(default=5e-4, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=16, ge=2, description="KTO's KL term pairs answers within a batch")
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)
    from_pairs: bool = True
    """Besides thumbed answers, each reward-model pair gives a desirable (chosen) and an undesirable (rejected) row."""


class PpoSettings(BaseModel):
    """An online RL round against the reward model (``trainer.ppo``: clipped objective + KL to the reference)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.05, ge=0, description="weight of the KL penalty to the reference (the base)")
    learning_rate: float = Field(default=1e-4, gt=0)
    steps: int = Field(default=40, ge=1, description="optimizer steps in one round")
    prompts_per_step: int = Field(default=4, ge=1)
    generations: int = Field(default=4, ge=2, description="answers sampled per prompt (the advantage's baseline)")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    epsilon: float = Field(default=0.2, gt=0, description="PPO's ratio clip")
    iterations: int = Field(default=2, ge=1, description="optimisation passes over each batch of samples")


class GrpoSettings(BaseModel):
    """Offline GRPO/RLOO on the groups the gateway served (``trainer.grpo``): each best-of-N request's samples, their
    rewards (a thumb folded in) and vLLM's log-probs, importance-weighted and clipped, with a KL penalty to the base."""

    model_config = ConfigDict(extra="forbid")

    baseline: Literal["group", "leave_one_out"] = "group"
    """``group``: GRPO's (reward − group mean) / group standard deviation; ``leave_one_out``: RLOO's reward minus the
    mean of the group's other samples."""
    beta: float = Field(default=0.04, ge=0, description="weight of the per-token KL to the reference (the base)")
    learning_rate: float = Field(default=2e-4, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=16, ge=1, description="samples per optimizer step")
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="clip of the per-token importance ratio")
    dual_clip: float = Field(default=3.0, gt=1, description="floor of a negative-advantage sample's loss, x its advantage")


Accept = Literal["no_loss", "gain"]


class RewardSettings(BaseModel):
    """A reward-model refit (``--refit-reward-model``): Bradley–Terry on what thumbs say (``trainer.reward``)."""

    model_config = ConfigDict(extra="forbid")

    pairs: Literal["thumb_vs_thumb", "thumb_vs_candidates"] = "thumb_vs_thumb"
    """``thumb_vs_thumb``: an answer thumbed up against one thumbed down (only what users judged);
    ``thumb_vs_candidates``: the thumbed answer against its request's other candidates, ranked by the reward model."""
    max_pairs: int = Field(default=4096, ge=1, description="thumb_vs_thumb: up x down pairs drawn at most")

    min_pairs: int = Field(default=16, ge=1, description="fewer thumb-decided pairs: the refit is skipped (exit 0)")
    holdout_every: int = Field(default=5, ge=2, description="every k-th completion thumbed up is held out, with its pairs")
    holdout_every_down: int = Field(default=2, ge=2, description="every k-th completion thumbed down is held out")
    """Downs are the scarce side (a few a round at an up-rate of ~0.9) and bound the check's evidence, so more of them
    are held out than of the ups."""
    min_held_out: int = Field(default=5, ge=2)
    """Fewer distinct held-out answers on either side of the pairs (ups or downs): the check cannot judge, and the refit
    is registered but not made current."""
    confidence: float = Field(default=0.9, gt=0.5, lt=1)
    """Two-sided level of the interval on the held-out agreement's change (each bound is one-sided at (1 + c) / 2)."""
    accept: Accept = "no_loss"
    """When a judged refit is made current. ``no_loss``: unless the held-out change's upper bound is below ``-margin``
    (refused on evidence that it lost agreement). ``gain``: only when the lower bound is above ``-margin`` (on evidence
    that it gained; with the few downs a window holds out, it refused 17 of run 6's 24 refits in a replay, 10 of which a
    pooled held-out set of ~125 downs showed significantly better: README, "The rule, replayed in order")."""
    margin: float = Field(default=0.0, ge=0, le=1)
    """The agreement a refit may lose: ``no_loss`` refuses one shown to lose more; ``gain`` with 0 asks for an
    improvement with evidence, with a positive margin it accepts one shown to lose at most that much."""
    learning_rate: float = Field(default=5e-5, gt=0)
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=512, ge=8)
    seed: int = 0


class EvalSettings(BaseModel):
    """What a round measures on its new adapter before registering it."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(default=32, ge=1, description="prompts from the window sampled for KL and length")
    max_new_tokens: int = Field(default=64, ge=1)


class KlBudgetSettings(BaseModel):
    """A bound on how far one round may move the policy: sequence-level KL to the reference (the starting
    policy), in nats per response, as the round measures it before registering (the gate's figure)."""

    model_config = ConfigDict(extra="forbid")

    max_nats: float | None = Field(default=None, gt=0, description="None: no budget")
    backoff: float = Field(default=0.5, gt=0, lt=1, description="over budget: train again from the parent at lr x this")
    aim: float | None = Field(default=0.5, gt=0, lt=1)
    """Over budget, the next try's learning-rate scale is this try's times ``min(backoff, aim * (max_nats - p) / (kl - p))``,
    ``p`` the parent's KL to the reference (0 in a first round): the step scales the round's own move from its parent.
    From the reference, KL grew at least about linearly with the step (run 5, seed 0, round 3: 18.8, 10.6 and 3.9 nats
    at 1, 0.5 and 0.25x), so a try aimed at half the budget lands under it where halving the step twice did not. From a
    parent far along, the move grew more slowly than the step near the full step (a power of 0.57-0.73 in run 8), and
    the aimed second try went over again in all three such rounds there, the third fitting (README, "Run 8"). None:
    ``backoff`` alone."""
    retries: int = Field(default=2, ge=0, description="tries after the first; over budget on all: the round is skipped")
    min_room: float | None = Field(default=0.1, gt=0, lt=1)
    """A round whose parent is already within this share of the budget (its KL to the reference, as its own round
    measured it, over ``(1 - min_room) x max_nats``) is skipped before training: in the loop's runs such rounds' tries
    all went over, or one fitted by barely moving the policy. None: every round trains."""
    refine_below: float | None = Field(default=0.1, gt=0, lt=1)
    """A try that fits at under this share of the budget, after one over it, is aimed again when a retry remains: at
    ``aim`` x the budget on the line through the two tries' (log step, log KL); the refined try is the round's if it
    fits, else the one before. None: the first try that fits is the round's."""


class ThumbHistorySettings(BaseModel):
    """Thumbs that accumulate (``trainer.history``): thumbed completions of earlier policy versions are read too."""

    model_config = ConfigDict(extra="forbid")

    versions: int = Field(default=0, ge=0)
    """Thumbed completions served by up to this many versions before the current one (and by a newer, refused canary)
    are trained on as well; 0: the current version's only."""
    max_age: str | None = None
    """Their staleness bound (7d, 12h); None: ``trainer.max_age``."""
    decay: float = Field(default=0.5, gt=0, le=1)
    """A thumb served k versions ago counts ``decay ** k`` (DPO: as a repetition, its fraction drawn per completion)."""


class WatchSettings(BaseModel):
    """The reward-hacking watch (``trainer.watch``): checks before each round, which pauses while it fires."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    pause: bool = True
    """Rounds skip while the watch fires; off: it records, alerts and shows, and rounds go on (observe only)."""
    alpha: float = Field(default=0.05, gt=0, lt=1, description="family-wise, split over the checks (Bonferroni)")
    min_answers: int = Field(default=50, ge=2, description="answers per version before length, refusal or reward checks")
    min_thumbs: int = Field(default=20, ge=2, description="thumbs per version before the thumbs-up rate counts")
    min_each_thumb: int = Field(default=5, ge=2, description="thumbs up and thumbs down before agreement counts")
    min_agreement: float = Field(default=0.5, ge=0, le=1)
    """The reward model's agreement with thumbs (AUC) significantly below this fires (0.5: no better than chance)."""
    max_length_growth: float = Field(default=1.3, gt=1, description="answers this many times the parent's fire")
    refusal_margin: float = Field(default=0.05, ge=0, description="a refusal rate rise beyond this fires")
    max_kl: float | None = Field(default=None, gt=0, description="KL to the reference beyond this fires; None: unchecked")


class TrainerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: PairSettings = Field(default_factory=PairSettings)
    registry_dir: Path = Path("registry")
    """Versioned models and the current/canary pointers (``versioning.registry``); shared with the gateways."""
    base_policy: Path = Path("models/default/policy")
    """The fixed base model every LoRA version sits on (what vLLM serves as the base)."""
    base_reward_model: Path = Path("models/default/reward_model")
    """The reward model PPO optimises while the registry has no reward-model version."""
    base_policy_version: str = "base"
    """The base policy's version label (the gateway's ``policy_version``) while no version is current."""
    base_rm_version: str = "rm-base"
    """The reward model's version label while the registry has no reward-model version."""
    algorithm: Literal["dpo", "kto", "ppo", "grpo"] = "dpo"
    format: Literal["lora", "full"] = "lora"
    """What a version is: a LoRA adapter over the base (hot-swapped into running vLLM) or, DPO only, all the
    policy's weights (learns more at tiny sizes, served without the adapter's cost; the gateway swaps it
    blue-green, starting a vLLM on the version's directory: ``swap.full``)."""
    min_pairs: int = Field(
        default=32,
        ge=1,
        description="fewer pairs (KTO: rows; PPO: prompts; GRPO: groups) in the window: the round is skipped (exit 0)",
    )
    max_age: str = "7d"
    """Staleness bound: records older than this are not trained on (7d, 12h, 30m)."""
    publish_to: Literal["current", "canary"] = "current"
    """The pointer a trained version is set to; gateways follow it."""
    keep_versions: int = Field(default=10, ge=1, description="registry retention after each round")
    cpus: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    """The CPUs a round runs on (its process's affinity, set before torch loads; None: every CPU it is given). Beside a
    busy vLLM on one machine, the cores vLLM's pinned worker leaves free (``trainer.cpu`` has what was measured)."""
    threads: int | None = Field(default=None, ge=1)
    """torch's CPU threads for the round (None: one per CPU in ``cpus``, or torch's default, one per core). Set it to the
    pod's CPU request where the pod has no CPU limit: torch would start one thread per core of the node."""
    metrics_file: Path | None = None
    """Prometheus textfile the round's outcome is written to (node-exporter's textfile collector);
    None: ``<registry_dir>/metrics/trainer.prom``."""
    pushgateway_url: str | None = None
    """Also push the round's metrics to a Prometheus Pushgateway (a CronJob's usual route)."""
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    dpo: DpoSettings = Field(default_factory=DpoSettings)
    kto: KtoSettings = Field(default_factory=KtoSettings)
    ppo: PpoSettings = Field(default_factory=PpoSettings)
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    kl_budget: KlBudgetSettings = Field(default_factory=KlBudgetSettings)
    history: ThumbHistorySettings = Field(default_factory=ThumbHistorySettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)

    @model_validator(mode="before")
    @classmethod
    def _adapter_keys_under_dpo(cls, data: Any) -> Any:
        """Configs written before ``trainer.adapter`` existed kept its keys under ``trainer.dpo``: still read, with a warning."""
        dpo = data.get("dpo") if isinstance(data, dict) else None
        if not isinstance(dpo, dict) or not (moved := {k: v for k, v in dpo.items() if k in ADAPTER_KEYS}):
            return data
        adapter = dict(data.get("adapter") or {})
        if clash := sorted(set(moved) & set(adapter)):
            raise ValueError(f"trainer.dpo.{clash[0]} and trainer.adapter.{clash[0]} are both set; keep trainer.adapter's")
        warnings.warn(
            f"trainer.dpo.{{{','.join(moved)}}} moved to trainer.adapter (the adapter's settings, shared by every algorithm)",
            DeprecationWarning,
            stacklevel=2,
        )
        rest = {k: v for k, v in dpo.items() if k not in ADAPTER_KEYS}
        return {**data, "dpo": rest, "adapter": {**adapter, **moved}}


class TrainerSettings(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", env_nested_delimiter="__", extra="ignore")

    store: StoreSettings = Field(default_factory=StoreSettings)
    trainer: TrainerSection = Field(default_factory=TrainerSection)


def load(path: Path | None) -> TrainerSettings:
    """Settings from the deployment's YAML file (optional), with the environment on top."""
    data = read_yaml(path)
    try:
        return TrainerSettings(**data)
    except ValueError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
