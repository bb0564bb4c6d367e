"""One training round: the log's window → pairs → DPO, KTO or PPO → evaluation → a registered version → the pointer.

Knows the round's order and its rules:
- the data window is what the *current* policy version served, scored by the *current*
  reward-model version (rewards of two reward models are never compared), within a
  staleness bound; a thumbed completion is kept whatever scored it (its thumb decides);
- too few pairs is a skipped round, not a failure (a quiet night is not a failed CronJob);
- the new adapter starts from its parent's adapter; the reference is the base policy;
- before registering, it measures the adapter (loss, reward margin, KL to the reference and
  answer length on sampled answers) and computes the swap probe (``trainer.probe``);
- with a KL budget (``trainer.kl_budget``), a version further from the reference than the
  budget is trained again from the same parent at a smaller learning rate; if no try fits,
  the round is skipped and nothing is registered;
- it publishes through the registry (nothing half-registered after a crash) and only then
  moves the pointer that gateways follow;
- its outcome goes to Prometheus metrics (a textfile, and a Pushgateway when configured).
Only one round runs at a time (``trainer.lock``). Does not know how gateways swap.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.export import parse_time, window
from trainer.lock import round_lock
from trainer.pairs import build, thumbed, weighted
from trainer.registry import Registry, RegistryError
from trainer.settings import TrainerSettings

log = logging.getLogger("trainer.round")
Outcome = Literal["trained", "skipped", "failed"]
ALGORITHMS = ("dpo", "kto", "ppo")


class RoundError(Exception):
    """A round that cannot run (bad input, missing registry, unreadable log); one line for the user."""


@dataclass
class RoundResult:
    outcome: Outcome
    reason: str
    seconds: float = 0.0
    version: str | None = None
    parent: str | None = None
    pairs: int = 0
    completions: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "dpo"

    def summary(self) -> str:
        head = f"round {self.outcome}: {self.reason} ({self.seconds:.1f} s)"
        if self.outcome != "trained":
            return head
        f = self.figures
        if self.algorithm == "reward":
            return (
                f"{head}\n  {self.pairs} thumb-decided pairs ({f['train_pairs']} trained on, {f['held_out_pairs']} held out), "
                f"loss {f['loss']:.4f}\n  agreement with thumbs: held out {f['agreement_before_held_out']:.3f} -> "
                f"{f['agreement_after_held_out']:.3f}, trained-on {f['agreement_before_train']:.3f} -> "
                f"{f['agreement_after_train']:.3f}"
            )
        unit = {"dpo": "pairs", "kto": "KTO rows", "ppo": "prompts"}[self.algorithm]
        nan = math.nan
        extra = {
            "dpo": f"reward margin {f.get('reward_margin', nan):.3f}, reward accuracy {f.get('reward_accuracy', nan):.2f}",
            "kto": f"{f.get('desirable', 0)} desirable, {f.get('undesirable', 0)} undesirable, {f.get('from_thumbs', 0)} thumbed",
            "ppo": f"mean reward {f.get('reward', nan):.3f}",
        }[self.algorithm]
        return (
            f"{head}\n  {self.algorithm} version {self.version} (parent {self.parent or 'base'}), {self.pairs} {unit} from "
            f"{self.completions} completions\n  loss {f['loss']:.4f}, {extra}, KL to reference {f['kl_to_reference']:.3g} ± "
            f"{f.get('kl_to_reference_stderr', nan):.2g} nats, mean length {f['mean_length']:.1f} tokens"
        )


def policy_label(settings: TrainerSettings, registry: Registry) -> tuple[str | None, str]:
    """(current policy version or None for the base, the label the gateway logs it under)."""
    current = registry.pointer("policy", "current")
    return (current.version, current.version) if current else (None, settings.trainer.base_policy_version)


def rm_label(settings: TrainerSettings, registry: Registry) -> str:
    current = registry.pointer("reward_model", "current")
    return current.version if current else settings.trainer.base_rm_version


def run(settings: TrainerSettings, algorithm: str | None = None, *, progress: bool = True) -> RoundResult:
    """One round under the round lock. Raises RoundError for bad input; LockHeld when another round runs."""
    s = settings.trainer
    algorithm = algorithm or s.algorithm
    if algorithm not in ALGORITHMS:
        raise RoundError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    if not (s.base_policy / "config.json").is_file():
        raise RoundError(f"no base policy at {s.base_policy} (run `python -m trainer bootstrap` or set trainer.base_policy)")
    if algorithm == "ppo" and not (s.base_reward_model / "config.json").is_file():
        raise RoundError(f"no reward model at {s.base_reward_model} for --algo ppo (set trainer.base_reward_model)")
    url = settings.store.database_url()
    started = time.perf_counter()
    with round_lock(s.registry_dir, url):
        result = _run_locked(settings, algorithm, url, progress)
    result.seconds = time.perf_counter() - started
    return result


def _run_locked(settings: TrainerSettings, algorithm: str, url: str, progress: bool) -> RoundResult:
    s = settings.trainer
    registry = Registry(s.registry_dir)
    trial = registry.pointer("policy", "canary")
    if s.publish_to == "canary" and trial is not None:  # a new canary would restart the trial the gate is judging
        return RoundResult("skipped", f"policy {trial.version} is still on trial as the canary; the next round waits for the "
                           "gateway's canary gate to promote or roll it back", parent=None, pairs=0, completions=0)  # fmt: skip
    parent, policy_version = policy_label(settings, registry)
    rm_version = rm_label(settings, registry)
    since = parse_time(s.max_age)
    until = time.time()
    labelled = _read_window(settings, url, since, until, policy_version, rm_version)
    exported = build(labelled, s.pairs)
    stats = exported.stats
    data_window = {
        "since": since, "until": until, "policy_version": policy_version, "rm_version": rm_version,
        "completions": stats.completions, "pairs": stats.pairs, "from_thumbs": stats.from_thumbs,
    }  # fmt: skip
    data = _Data(exported.pairs, thumbed(labelled), [r.messages for r, _ in labelled])
    available, unit = data.size(algorithm, s.kto.from_pairs)
    if available < s.min_pairs:
        reason = (
            f"{available} {unit} from {stats.completions} completions served by {policy_version} and scored by "
            f"{rm_version} in the last {s.max_age}; trainer.min_pairs is {s.min_pairs}"
        )
        return RoundResult("skipped", reason, parent=parent, pairs=stats.pairs, completions=stats.completions)
    return _train(settings, registry, algorithm, parent, rm_version, data, data_window, progress)


@dataclass
class _Data:
    """What the window gives each algorithm: pairs (DPO, KTO), thumbed answers (KTO), prompts (PPO, evaluation)."""

    pairs: list[dict[str, Any]]
    thumbed: list[dict[str, Any]]
    prompts: list[list[dict[str, Any]]]

    def size(self, algorithm: str, kto_from_pairs: bool) -> tuple[int, str]:
        if algorithm == "kto":
            return len(self.thumbed) + (2 * len(self.pairs) if kto_from_pairs else 0), "KTO rows (thumbs and pair sides)"
        if algorithm == "ppo":
            return len({repr(p) for p in self.prompts}), "distinct prompts"
        return len(self.pairs), "pairs"


def _train(
    settings: TrainerSettings,
    registry: Registry,
    algorithm: str,
    parent: str | None,
    rm_version: str,
    data: _Data,
    data_window: dict[str, Any],
    progress: bool,
) -> RoundResult:
    import torch
    from transformers import AutoTokenizer

    from trainer import adapter, kl, probe

    s = settings.trainer
    tokenizer = AutoTokenizer.from_pretrained(s.base_policy)
    parent_dir = registry.path("policy", parent) if parent else None
    parent_format = registry.verify("policy", parent).format if parent is not None else None
    if s.format == "full" and algorithm != "dpo":
        raise RoundError(f"trainer.format full is implemented for dpo only, not {algorithm}")
    if s.format == "lora" and parent_format == "full":
        raise RoundError(f"the current version {parent} is a full fine-tune; trainer.format lora cannot continue it")
    budget = s.kl_budget
    tries: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix=f"{algorithm}-") as work:
        for attempt in range(1 + (budget.retries if budget.max_nats is not None else 0)):
            factor = budget.backoff**attempt
            torch.manual_seed(s.dpo.seed)
            if s.format == "full":
                init = adapter.full_model(s.base_policy, parent_dir, parent_is_adapter=parent_format == "lora")
            else:
                init = adapter.policy_model(s.base_policy, parent_dir, s.dpo)
            attempt_dir = Path(work) / f"try{attempt}"
            attempt_dir.mkdir()
            trained, model, used, hyperparameters = _fit(_step_scaled(settings, factor), registry, algorithm, rm_version,
                                                         init, tokenizer, data, attempt_dir, progress)  # fmt: skip
            if not math.isfinite(trained.loss):
                raise RoundError(f"training diverged (loss {trained.loss}); nothing registered")
            # Everything below measures the version as saved (what vLLM will load), not the trainer's in-memory model:
            # after a bf16 round the two gave probe log-probs 0.014 nats per token apart (cause not pinned down).
            saved = attempt_dir / "version"
            model.save_pretrained(saved)
            if s.format == "full":
                tokenizer.save_pretrained(saved)  # vLLM serves the directory as a model of its own
                served = adapter.load_full(saved)
            else:
                served = adapter.load_adapter(s.base_policy, saved)
            eval_prompts = _distinct_prompts(tokenizer, data.prompts, s.evaluation.prompts)
            drift = kl.measure(served, tokenizer.eos_token_id, tokenizer.pad_token_id, eval_prompts,
                               s.evaluation.max_new_tokens, seed=s.dpo.seed, reference=init.reference)  # fmt: skip
            tries.append({"step_scale": factor, "kl_to_reference": drift.kl, "kl_to_reference_stderr": drift.kl_stderr})
            if budget.max_nats is None or drift.kl <= budget.max_nats:
                break
            log.warning("round %s: KL to the reference %s is over trainer.kl_budget.max_nats %.3g at %.3gx the "
                        "learning rate", algorithm, drift, budget.max_nats, factor)  # fmt: skip
        else:
            listed = ", ".join(f"{t['kl_to_reference']:.3g} ± {t['kl_to_reference_stderr']:.2g} at {t['step_scale']:.3g}x"
                               for t in tries)  # fmt: skip
            return RoundResult(
                "skipped", f"every try went over the KL budget of {budget.max_nats} nats to the reference "
                f"(nats at the learning-rate scale: {listed}); nothing registered", parent=parent, pairs=used,
                completions=data_window["completions"], algorithm=algorithm,
            )  # fmt: skip
        probe.compute(served, probe.sequences(tokenizer)).save(saved)
        figures: dict[str, Any] = {
            "loss": trained.loss, **trained.figures, "kl_to_reference": drift.kl,
            "kl_to_reference_stderr": drift.kl_stderr, "mean_length": drift.mean_length,
            "kl_samples": drift.samples, "steps": trained.steps, "train_seconds": trained.seconds,
        }  # fmt: skip
        if budget.max_nats is not None:
            figures["kl_budget_tries"] = tries

        def write(directory: Path) -> None:
            for file in saved.iterdir():
                if file.is_file() and file.name != "README.md":
                    shutil.copy2(file, directory / file.name)

        manifest = registry.publish(
            "policy", write, format=s.format, parent=parent, algorithm=algorithm, hyperparameters=hyperparameters,
            data_window={**data_window, "rows": used}, evaluation=figures,
        )  # fmt: skip
    registry.set_pointer("policy", s.publish_to, manifest.version, reason=f"{algorithm} on {used} rows")
    try:
        registry.retain("policy", s.keep_versions)
    except (OSError, RegistryError) as exc:  # retention is housekeeping: the round itself succeeded
        log.warning("registry retention failed: %s", exc)
    return RoundResult(
        "trained", f"{manifest.version} registered and set as {s.publish_to}", version=manifest.version, parent=parent,
        pairs=used, completions=data_window["completions"], figures=figures, algorithm=algorithm,
    )  # fmt: skip


def _step_scaled(settings: TrainerSettings, factor: float) -> TrainerSettings:
    """The settings with every policy algorithm's learning rate times ``factor`` (the KL budget's back-off)."""
    if factor == 1.0:
        return settings
    s = settings.trainer
    scaled = {name: getattr(s, name).model_copy(update={"learning_rate": getattr(s, name).learning_rate * factor})
              for name in ("dpo", "kto", "ppo")}  # fmt: skip
    return settings.model_copy(update={"trainer": s.model_copy(update=scaled)})


def _fit(
    settings: TrainerSettings,
    registry: Registry,
    algorithm: str,
    rm_version: str,
    init: Any,
    tokenizer: Any,
    data: _Data,
    work: Path,
    progress: bool,
) -> tuple[Any, Any, int, dict[str, Any]]:
    """(what training reports, the trained peft model, rows used, the hyper-parameters for the manifest)."""
    from trainer.adapter import Trained

    s = settings.trainer
    shape = {k: v for k, v in s.dpo.model_dump().items() if k.startswith("lora_") or k in ("target_modules", "bf16", "seed")}
    if algorithm == "kto":
        from trainer import kto

        made = kto.rows(data.thumbed, data.pairs if s.kto.from_pairs else [], tokenizer, s.dpo.max_length, s.dpo.seed)
        trained, model = kto.train(init, tokenizer, made.rows, s.kto, s.dpo, work, progress=progress)
        counts = {"desirable": made.desirable, "undesirable": made.undesirable, "from_thumbs": made.from_thumbs,
                  "retokenized": made.retokenized, "truncated": made.truncated}  # fmt: skip
        trained.figures.update(counts)
        return trained, model, len(made.rows), {**s.kto.model_dump(), **shape, "max_length": s.dpo.max_length}
    if algorithm == "ppo":
        from trainer import ppo

        rm_dir = registry.path("reward_model", rm_version) if rm_version != s.base_rm_version else s.base_reward_model
        if rm_version != s.base_rm_version:
            registry.verify("reward_model", rm_version)
        prompts = list({repr(p): p for p in data.prompts}.values())
        trained, model = ppo.train(init, tokenizer, prompts, ppo.RewardModel(rm_dir), s.ppo, s.dpo, work, progress=progress)
        params = {**s.ppo.model_dump(), **shape, "implementation": ppo.IMPLEMENTATION, "reward_model": rm_version}
        return trained, model, len(prompts), params
    from trainer import dpo

    made_dpo = dpo.rows(weighted(data.pairs, s.pairs.thumb_weight), tokenizer, s.dpo.max_length)
    reference = f"{dpo.reference_id(s.base_policy)}-{'bf16' if s.dpo.bf16 else 'fp32'}"
    cache = dpo.RefCache(s.registry_dir / "cache" / "ref_logps.sqlite", reference)
    result, model = dpo.train(init, tokenizer, made_dpo.rows, s.dpo, work, cache if s.dpo.cache_reference else None,
                              progress=progress)  # fmt: skip
    figures = {
        "reward_margin": result.reward_margin, "reward_accuracy": result.reward_accuracy, "ref_cached": result.ref_cached,
        "ref_computed": result.ref_computed, "retokenized": made_dpo.retokenized, "truncated": made_dpo.truncated,
    }  # fmt: skip
    trained = Trained(result.steps, result.seconds, result.loss, figures, result.history)
    return trained, model, len(made_dpo.rows), s.dpo.model_dump()


def refit_reward_model(settings: TrainerSettings, *, progress: bool = True) -> RoundResult:
    """Refit the current reward model on the window's thumb-decided pairs, under the round lock; register it
    as a reward-model version and make it current when its held-out agreement with thumbs does not fall."""
    s = settings.trainer
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    url = settings.store.database_url()
    started = time.perf_counter()
    with round_lock(s.registry_dir, url):
        result = _refit_locked(settings, url, progress)
    result.seconds = time.perf_counter() - started
    return result


def _read_window(settings: TrainerSettings, url: str, since: float, until: float, policy_version: str | None,
                 rm_version: str | None) -> list[tuple[Any, Any]]:  # fmt: skip
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store.sql import SqlStore

    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        raise RoundError(f"no log database at {url} (has the gateway run with store.enabled?)")
    store = SqlStore(url, connect_timeout_s=settings.store.connect_timeout_s)
    try:
        return list(window(store, since, until, policy_version, rm_version, settings.trainer.pairs.thumbs_override))
    except SQLAlchemyError as exc:
        raise RoundError(f"cannot read the log: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        store.close()


def _refit_locked(settings: TrainerSettings, url: str, progress: bool) -> RoundResult:
    from trainer import reward
    from trainer.settings import PairSettings

    s = settings.trainer
    registry = Registry(s.registry_dir)
    since, until = parse_time(s.max_age), time.time()
    labelled = _read_window(settings, url, since, until, None, None)  # a thumb orders a pair whatever scored it
    built = build(labelled, PairSettings(policy=s.pairs.policy, thumbs_override=True))
    pairs = [p for p in built.pairs if p["source"] == "thumb"]
    if len(pairs) < s.reward.min_pairs:
        reason = f"{len(pairs)} thumb-decided pairs in the last {s.max_age}; trainer.reward.min_pairs is {s.reward.min_pairs}"
        return RoundResult("skipped", reason, pairs=len(pairs), completions=len(labelled), algorithm="reward")
    current = registry.pointer("reward_model", "current")
    parent = current.version if current else None
    source = registry.path("reward_model", parent) if parent else s.base_reward_model
    if parent is not None:
        registry.verify("reward_model", parent)
    elif not (source / "config.json").is_file():
        raise RoundError(f"no reward model at {source} (set trainer.base_reward_model)")
    model, tokenizer = reward.load(source)
    data = reward.split(pairs, s.reward.holdout_every)
    with tempfile.TemporaryDirectory(prefix="reward-") as work:
        fitted = reward.refit(model, tokenizer, data, s.reward, Path(work), progress=progress)
        if not math.isfinite(fitted.loss):
            raise RoundError(f"reward-model training diverged (loss {fitted.loss}); nothing registered")
        saved = Path(work) / "model"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        figures: dict[str, Any] = {
            "loss": fitted.loss, "steps": fitted.steps, "train_seconds": fitted.seconds,
            "agreement_before_train": fitted.before["train"], "agreement_after_train": fitted.after["train"],
            "agreement_before_held_out": fitted.before["held_out"], "agreement_after_held_out": fitted.after["held_out"],
            "train_pairs": len(data.train), "held_out_pairs": len(data.held_out),
        }  # fmt: skip

        def write(directory: Path) -> None:
            for file in saved.iterdir():
                if file.is_file():
                    shutil.copy2(file, directory / file.name)

        manifest = registry.publish(
            "reward_model", write, format="full", parent=parent, algorithm="bradley-terry",
            hyperparameters=s.reward.model_dump(), data_window={"since": since, "until": until, "pairs": len(pairs)},
            evaluation=figures,
        )  # fmt: skip
    before, after = fitted.before["held_out"], fitted.after["held_out"]
    label = parent or s.base_rm_version
    if math.isnan(after) or after < before:
        reason = (
            f"reward model {manifest.version} registered but not made current: held-out agreement with thumbs "
            f"{before:.3f} -> {after:.3f} ({len(data.held_out)} pairs); {label} stays current"
        )
    else:
        registry.set_pointer("reward_model", "current", manifest.version, reason=f"agreement {before:.3f} -> {after:.3f}")
        reason = f"reward model {manifest.version} registered and set as current (was {label})"
    try:
        registry.retain("reward_model", s.keep_versions)
    except (OSError, RegistryError) as exc:
        log.warning("registry retention failed: %s", exc)
    return RoundResult("trained", reason, version=manifest.version, parent=parent, pairs=len(pairs),
                       completions=len(labelled), figures=figures, algorithm="reward")  # fmt: skip


def _distinct_prompts(tokenizer: Any, prompts: list[list[dict[str, Any]]], limit: int) -> list[list[int]]:
    from trainer.adapter import prompt_ids  # torch-free, but keeps the module's imports light

    seen: set[str] = set()
    out: list[list[int]] = []
    for messages in prompts:
        key = repr(messages)
        if key in seen:
            continue
        seen.add(key)
        out.append(prompt_ids(tokenizer, messages))
        if len(out) == limit:
            break
    return out
