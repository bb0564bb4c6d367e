"""One training round: the log's window → pairs → DPO → evaluation → a registered version → the pointer.

Knows the round's order and its rules:
- the data window is what the *current* policy version served, scored by the *current*
  reward-model version (rewards of two reward models are never compared), within a
  staleness bound; a thumbed completion is kept whatever scored it (its thumb decides);
- too few pairs is a skipped round, not a failure (a quiet night is not a failed CronJob);
- the new adapter starts from its parent's adapter; the reference is the base policy;
- before registering, it measures the adapter (loss, reward margin, KL to the reference and
  answer length on sampled answers) and computes the swap probe (``trainer.probe``);
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
from trainer.pairs import build
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

    def summary(self) -> str:
        head = f"round {self.outcome}: {self.reason} ({self.seconds:.1f} s)"
        if self.outcome != "trained":
            return head
        f = self.figures
        return (
            f"{head}\n  version {self.version} (parent {self.parent or 'base'}), {self.pairs} pairs from "
            f"{self.completions} completions\n  loss {f['loss']:.4f}, reward margin {f['reward_margin']:.3f}, "
            f"reward accuracy {f['reward_accuracy']:.2f}, KL to reference {f['kl_to_reference']:.3f} nats, "
            f"mean length {f['mean_length']:.1f} tokens"
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
    if algorithm != "dpo":
        raise RoundError(f"--algo {algorithm} is not implemented yet; dpo is")
    if not s.registry_dir.is_dir():
        raise RoundError(f"no registry at {s.registry_dir} (create it with `python -m trainer registry init`)")
    if not (s.base_policy / "config.json").is_file():
        raise RoundError(f"no base policy at {s.base_policy} (run `python -m trainer bootstrap` or set trainer.base_policy)")
    url = settings.store.database_url()
    started = time.perf_counter()
    with round_lock(s.registry_dir, url):
        result = _run_locked(settings, url, progress)
    result.seconds = time.perf_counter() - started
    return result


def _run_locked(settings: TrainerSettings, url: str, progress: bool) -> RoundResult:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store.sql import SqlStore

    s = settings.trainer
    registry = Registry(s.registry_dir)
    parent, policy_version = policy_label(settings, registry)
    rm_version = rm_label(settings, registry)
    since = parse_time(s.max_age)
    until = time.time()
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        raise RoundError(f"no log database at {url} (has the gateway run with store.enabled?)")
    store = SqlStore(url, connect_timeout_s=settings.store.connect_timeout_s)
    try:
        labelled = list(window(store, since, until, policy_version, rm_version, s.pairs.thumbs_override))
    except SQLAlchemyError as exc:
        raise RoundError(f"cannot read the log: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        store.close()
    exported = build(labelled, s.pairs)
    stats = exported.stats
    data_window = {
        "since": since, "until": until, "policy_version": policy_version, "rm_version": rm_version,
        "completions": stats.completions, "pairs": stats.pairs, "from_thumbs": stats.from_thumbs,
    }  # fmt: skip
    if stats.pairs < s.min_pairs:
        reason = (
            f"{stats.pairs} pairs from {stats.completions} completions served by {policy_version} and scored by "
            f"{rm_version} in the last {s.max_age}; trainer.min_pairs is {s.min_pairs}"
        )
        return RoundResult("skipped", reason, parent=parent, pairs=stats.pairs, completions=stats.completions)
    prompts = [r.messages for r, _ in labelled]
    return _train(settings, registry, parent, exported.pairs, data_window, prompts, progress)


def _train(
    settings: TrainerSettings,
    registry: Registry,
    parent: str | None,
    pairs: list[dict[str, Any]],
    data_window: dict[str, Any],
    prompts: list[list[dict[str, Any]]],
    progress: bool,
) -> RoundResult:
    import torch
    from transformers import AutoTokenizer

    from trainer import dpo, kl, probe

    s = settings.trainer
    torch.manual_seed(s.dpo.seed)
    tokenizer = AutoTokenizer.from_pretrained(s.base_policy)
    made = dpo.rows(pairs, tokenizer, s.dpo.max_length)
    parent_dir = registry.path("policy", parent) if parent else None
    if parent is not None:
        registry.verify("policy", parent)
    init = dpo.policy_model(s.base_policy, parent_dir, s.dpo)
    reference = f"{dpo.reference_id(s.base_policy)}-{'bf16' if s.dpo.bf16 else 'fp32'}"
    cache = dpo.RefCache(s.registry_dir / "cache" / "ref_logps.sqlite", reference)
    with tempfile.TemporaryDirectory(prefix="dpo-") as work:
        result, model = dpo.train(init, tokenizer, made.rows, s.dpo, Path(work), cache if s.dpo.cache_reference else None,
                           progress=progress)  # fmt: skip
        if not math.isfinite(result.loss):
            raise RoundError(f"training diverged (loss {result.loss}); nothing registered")
        # Everything below measures the adapter as saved (what vLLM will load), not the trainer's in-memory model:
        # after a bf16 round the two gave probe log-probs 0.014 nats per token apart (cause not pinned down).
        saved = Path(work) / "adapter"
        model.save_pretrained(saved)
        served = dpo.load_adapter(s.base_policy, saved)
        eval_prompts = _distinct_prompts(tokenizer, prompts, s.evaluation.prompts)
        drift = kl.measure(served, tokenizer.eos_token_id, tokenizer.pad_token_id, eval_prompts,
                           s.evaluation.max_new_tokens, seed=s.dpo.seed)  # fmt: skip
        probe.compute(served, probe.sequences(tokenizer)).save(saved)
        figures = {
            "loss": result.loss, "reward_margin": result.reward_margin, "reward_accuracy": result.reward_accuracy,
            "kl_to_reference": drift.kl, "mean_length": drift.mean_length, "kl_samples": drift.samples,
            "steps": result.steps, "train_seconds": result.seconds, "ref_cached": result.ref_cached,
            "ref_computed": result.ref_computed, "retokenized": made.retokenized, "truncated": made.truncated,
        }  # fmt: skip

        def write(directory: Path) -> None:
            for file in saved.iterdir():
                if file.is_file() and file.name != "README.md":
                    shutil.copy2(file, directory / file.name)

        manifest = registry.publish(
            "policy", write, format="lora", parent=parent, algorithm="dpo",
            hyperparameters=s.dpo.model_dump(), data_window={**data_window, "rows": len(made.rows)}, evaluation=figures,
        )  # fmt: skip
    registry.set_pointer("policy", s.publish_to, manifest.version, reason=f"trained on {len(made.rows)} pairs")
    try:
        registry.retain("policy", s.keep_versions)
    except (OSError, RegistryError) as exc:  # retention is housekeeping: the round itself succeeded
        log.warning("registry retention failed: %s", exc)
    return RoundResult(
        "trained", f"{manifest.version} registered and set as {s.publish_to}", version=manifest.version, parent=parent,
        pairs=len(made.rows), completions=data_window["completions"], figures=figures,
    )  # fmt: skip


def _distinct_prompts(tokenizer: Any, prompts: list[list[dict[str, Any]]], limit: int) -> list[list[int]]:
    from trainer.dpo import prompt_ids  # imports TRL: only when a round trains

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
