"""DPO on logged pairs with TRL: a LoRA adapter over the fixed base policy, cached reference log-probs.

Knows how exported pairs become TRL's tokenized rows from the *sampled* token ids the
gateway logged (the prompt goes through the model's chat template; only an answer with no
stored ids is re-tokenised, and counted) and how reference
log-probs are reused: the reference is the base policy with the adapter disabled, which
never changes, so each (prompt, answer)'s log-prob is computed once and kept in a small
SQLite cache keyed by the base model's checksum, across epochs and rounds. Does not read
the log or write the registry (``trainer.round`` does).

TRL's ``DPOTrainer`` is used as it is, with two hooks overridden: dataset preparation
(our rows are already token ids) and reference precomputation (our cache instead of a
``datasets`` cache file). Both are private methods of the pinned TRL major version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOTrainer  # type: ignore[attr-defined]

from trainer.adapter import AnswerIds, PolicyInit, fit, prompt_ids, trainer_args
from trainer.settings import AdapterSettings, DpoSettings

log = logging.getLogger("trainer.dpo")


@dataclass
class DpoRows:
    rows: list[dict[str, Any]]
    retokenized: int = 0
    """Answers with no stored token ids, tokenised from their text."""
    truncated: int = 0


@dataclass
class DpoResult:
    steps: int
    seconds: float
    loss: float
    reward_margin: float
    reward_accuracy: float
    ref_cached: int = 0
    """Reference log-probs found in the cache."""
    ref_computed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def reference_id(base: Path) -> str:
    """SHA-256 over the base model's config and weights: the cache's key for "this reference"."""
    digest = hashlib.sha256()
    for path in sorted([base / "config.json", *base.glob("*.safetensors"), *base.glob("*.bin")]):
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


class RefCache:
    """Reference log-prob of (prompt ids, answer ids) under one reference model; SQLite on disk."""

    def __init__(self, path: Path, reference: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.reference = reference
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS ref_logps (key TEXT PRIMARY KEY, logp REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def key(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> str:
        text = f"{self.reference}|{','.join(map(str, prompt_ids))}|{','.join(map(str, answer_ids))}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, float] = {}
        with closing(self._connect()) as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, logp FROM ref_logps WHERE key IN ({marks})", chunk).fetchall())
        return found

    def put_many(self, values: dict[str, float]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO ref_logps (key, logp) VALUES (?, ?)", values.items())


def rows(pairs: Iterable[dict[str, Any]], tokenizer: Any, max_length: int) -> DpoRows:
    """TRL's tokenized DPO rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) from exported pairs."""
    out = DpoRows([])
    answer = AnswerIds(tokenizer, max_length)
    for pair in pairs:
        prompt = prompt_ids(tokenizer, pair["prompt"])
        chosen = answer(prompt, pair.get("chosen_token_ids"), pair["chosen"][-1]["content"])
        if chosen is None:
            continue
        rejected = answer(prompt, pair.get("rejected_token_ids"), pair["rejected"][-1]["content"])
        if rejected is not None and chosen != rejected:
            out.rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    out.retokenized, out.truncated = answer.retokenized, answer.truncated
    return out


def train(
    init: PolicyInit,
    tokenizer: Any,
    dpo_rows: list[dict[str, Any]],
    settings: DpoSettings,
    shared: AdapterSettings,
    work_dir: Path,
    cache: RefCache | None,
    *,
    progress: bool = True,
    max_steps: int | None = None,
    processes: int = 1,
) -> tuple[DpoResult, Any]:
    """Train an adapter on the rows; returns the figures and the peft model. The reference is the base
    (adapter disabled). ``cache`` None: TRL recomputes the reference every step (the benchmark's baseline).
    ``settings.batch_size`` is the global batch: each of ``processes`` data-parallel processes takes its share,
    so a version trained on two GPUs took the same optimizer steps as one trained on one.

    The base model and a ``peft_config`` go to TRL, and the parent's weights are loaded into the adapter
    afterwards: given a ready ``PeftModel``, TRL would make a frozen copy of the parent adapter the
    reference, chaining the reference from round to round (what let the policy game the reward model's
    length bias in a probe here)."""
    import datasets
    from trl import DPOConfig  # type: ignore[attr-defined]

    per_process, rest = divmod(settings.batch_size, processes)
    if rest or not per_process:
        raise ValueError(f"trainer.dpo.batch_size {settings.batch_size} does not split evenly over {processes} processes")
    steps_per_epoch = math.ceil(len(dpo_rows) / settings.batch_size)
    total = max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))
    config = DPOConfig(
        beta=settings.beta, learning_rate=settings.learning_rate, num_train_epochs=settings.epochs,
        max_steps=max_steps or -1, per_device_train_batch_size=per_process,
        precompute_ref_log_probs=cache is not None, precompute_ref_batch_size=per_process, max_length=None,
        **trainer_args(work_dir, total, shared.seed, shared.bf16, progress),
    )  # fmt: skip
    trainer = _CachedReferenceDPO(
        cache, model=init.base, ref_model=init.reference, peft_config=init.lora, args=config,
        train_dataset=datasets.Dataset.from_list(dpo_rows), processing_class=tokenizer,
    )  # fmt: skip
    output, seconds, history = fit(trainer, init, progress)
    last = history[-1] if history else {}
    return DpoResult(
        steps=output.global_step, seconds=seconds, loss=float(output.training_loss),
        reward_margin=last.get("rewards/margins", math.nan), reward_accuracy=last.get("rewards/accuracies", math.nan),
        ref_cached=trainer.ref_cached, ref_computed=trainer.ref_computed, history=history,
    ), trainer.model  # fmt: skip


class _CachedReferenceDPO(DPOTrainer):
    """``DPOTrainer`` for pre-tokenized rows, with reference log-probs from (and into) a ``RefCache``."""

    def __init__(self, cache: RefCache | None, **kwargs: Any) -> None:
        self.ref_cache = cache
        self.ref_cached = 0
        self.ref_computed = 0
        super().__init__(**kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # already token ids: the sampled ones, not a re-tokenisation of the text

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        import torch
        from torch.utils.data import DataLoader

        cache = self.ref_cache
        assert cache is not None  # precompute is on only with a cache
        keys = [(cache.key(r["prompt_ids"], r["chosen_ids"]), cache.key(r["prompt_ids"], r["rejected_ids"])) for r in dataset]
        known = cache.get_many(k for pair in keys for k in pair)
        self.accelerator.wait_for_everyone()  # every process read the same cache before any writes to it
        missing = [i for i, (c, r) in enumerate(keys) if c not in known or r not in known]
        self.ref_cached = 2 * (len(keys) - len(missing))
        if missing:
            # Under data parallelism each process computes its share of the batches; gathering puts them back in the
            # loader's order on every process (as TRL's own precompute does).
            loader = self.accelerator.prepare(
                DataLoader(dataset.select(missing), batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
            )
            chosen_all: list[float] = []
            rejected_all: list[float] = []
            with torch.no_grad():
                for batch in loader:
                    reference = self.ref_model if self.ref_model is not None else self.model  # LoRA: adapter off
                    chosen, rejected = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(reference, batch))
                    chosen_all += chosen.tolist()
                    rejected_all += rejected.tolist()
            computed: dict[str, float] = {}
            for position, c, r in zip(missing, chosen_all, rejected_all, strict=True):
                key_c, key_r = keys[position]
                computed[key_c], computed[key_r] = c, r
            if self.accelerator.is_main_process:
                cache.put_many(computed)
            known.update(computed)
            self.ref_computed = 2 * len(missing)
        dataset = dataset.add_column("ref_chosen_logps", [known[c] for c, _ in keys])
        return dataset.add_column("ref_rejected_logps", [known[r] for _, r in keys])
