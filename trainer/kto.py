"""KTO on unpaired examples with TRL: thumbs (and, optionally, both sides of each reward-model pair).

Knows how the window becomes KTO's unpaired rows: every thumbed answer that was served
(desirable when thumbed up), and with ``kto.from_pairs`` the chosen side of each pair as
desirable and the rejected side as undesirable; each row uses the *sampled* token ids
(re-tokenised only when none are stored, and counted). Rows are shuffled once with the
round's seed, because TRL's KTO reads them in order (its KL term pairs each answer with
its batch neighbour's prompt). The reference is the base policy with the adapter disabled
(``trainer.adapter``). Does not read the log or write the registry.

``KTOTrainer`` is used as it is, with one hook overridden: dataset preparation (our rows
are already token ids; the KL completions are built the way TRL builds them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import KTOTrainer  # type: ignore[attr-defined]

from trainer.adapter import AnswerIds, PolicyInit, Trained, fit, prompt_ids, trainer_args
from trainer.settings import AdapterSettings, KtoSettings


@dataclass
class KtoRows:
    rows: list[dict[str, Any]]
    desirable: int = 0
    undesirable: int = 0
    from_thumbs: int = 0
    retokenized: int = 0
    truncated: int = 0


def rows(
    unpaired: Iterable[dict[str, Any]], pairs: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, seed: int
) -> KtoRows:
    """KTO rows (``prompt_ids``, ``completion_ids``, ``label``) from thumbed answers and, given pairs, their two sides.
    The same (prompt, answer) is kept once, a thumb's label first."""
    out = KtoRows([])
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    examples: list[tuple[list[dict[str, Any]], list[int] | None, str, bool, bool]] = [
        (u["prompt"], u.get("token_ids"), u["completion"][-1]["content"], bool(u["label"]), True) for u in unpaired
    ]
    for p in pairs:
        examples.append((p["prompt"], p.get("chosen_token_ids"), p["chosen"][-1]["content"], True, False))
        examples.append((p["prompt"], p.get("rejected_token_ids"), p["rejected"][-1]["content"], False, False))
    answer = AnswerIds(tokenizer, max_length)
    for messages, stored, text, label, thumb in examples:
        prompt = prompt_ids(tokenizer, messages)
        ids = answer(prompt, stored, text)
        if ids is None:
            continue
        key = (tuple(prompt), tuple(ids))
        if key in seen:
            continue
        seen.add(key)
        out.rows.append({"prompt_ids": prompt, "completion_ids": ids, "label": label})
        out.desirable += label
        out.undesirable += not label
        out.from_thumbs += thumb
    out.retokenized, out.truncated = answer.retokenized, answer.truncated
    random.Random(seed).shuffle(out.rows)
    return out


def train(
    init: PolicyInit,
    tokenizer: Any,
    kto_rows: list[dict[str, Any]],
    settings: KtoSettings,
    shared: AdapterSettings,
    work_dir: Path,
    *,
    progress: bool = True,
    max_steps: int | None = None,
) -> tuple[Trained, Any]:
    """Train the adapter with KTO's loss; the reference is the base (adapter disabled). ``shared``: the
    settings every algorithm shares (bf16, seed)."""
    import datasets
    from trl import KTOConfig  # type: ignore[attr-defined]

    total = max_steps or max(1, math.ceil(math.ceil(len(kto_rows) / settings.batch_size) * settings.epochs))
    config = KTOConfig(
        beta=settings.beta, desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, max_steps=max_steps or -1,
        per_device_train_batch_size=settings.batch_size, max_length=None,
        **trainer_args(work_dir, total, shared.seed, shared.bf16, progress),
    )  # fmt: skip
    trainer = _TokenizedKTO(
        model=init.base, peft_config=init.lora, args=config, train_dataset=datasets.Dataset.from_list(kto_rows),
        processing_class=tokenizer,
    )  # fmt: skip
    output, seconds, history = fit(trainer, init, progress)
    last = history[-1] if history else {}
    figures = {k: v for k, v in last.items() if k.startswith(("rewards/", "kl", "logps/"))}
    return Trained(output.global_step, seconds, float(output.training_loss), figures, history), trainer.model


class _TokenizedKTO(KTOTrainer):
    """``KTOTrainer`` for pre-tokenized rows."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if not self.calculate_KL:
            return dataset

        def add_kl_completion_ids(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            # TRL's KL estimate: each prompt with its batch neighbour's answer (rotate by one within the batch)
            batch["KL_completion_ids"] = [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]
            return batch

        return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)
