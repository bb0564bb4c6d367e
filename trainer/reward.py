"""Reward-model refit: Bradley–Terry on the log's thumb-decided pairs (TRL ``RewardTrainer``).

Knows how thumbs become reward-model training data and how a refit is judged: pairs whose
order a user's thumb decided (``trainer.pairs``, any policy version, any reward model: the
thumb, not a score, orders them) are split by completion id into a training part and a
held-out part (every ``holdout_every``-th completion); the current reward model is
fine-tuned (all weights; it is small) on the training part, and its **agreement with
thumbs** — the share of pairs it orders as the thumb did — is measured before and after on
both parts. A refit whose held-out agreement falls is registered but not made current.
Conversations are rendered and tokenised exactly as the gateway scores them
(``gateway.score.render``). Does not read the log (``trainer.round`` does).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.adapter import fit, trainer_args
from trainer.settings import RewardSettings


@dataclass
class Split:
    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]


def split(pairs: Sequence[dict[str, Any]], every: int) -> Split:
    """Held out: the pairs of every ``every``-th completion by a hash of its id (stable across refits)."""
    out = Split([], [])
    for pair in pairs:
        bucket = int(hashlib.sha256(str(pair["completion_id"]).encode()).hexdigest(), 16) % every
        (out.held_out if bucket == 0 else out.train).append(pair)
    return out


def _ids(tokenizer: Any, pair: dict[str, Any], side: str, max_length: int) -> list[int]:
    from gateway.score import Conversation, render

    text = render(tokenizer, Conversation(pair["prompt"], pair[side][-1]["content"]))
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_length]


def load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype="float32")
    if model.config.num_labels != 1:
        raise ValueError(f"{model_dir} is not a reward model: {model.config.num_labels} labels, expected 1")
    return model, tokenizer


def agreement(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], max_length: int) -> float:
    """Share of pairs scored chosen > rejected (ties count half); NaN without pairs."""
    import torch

    if not pairs:
        return math.nan
    model.eval()
    hits = 0.0
    with torch.inference_mode():
        for pair in pairs:
            scores = [
                float(model(input_ids=torch.tensor([_ids(tokenizer, pair, side, max_length)])).logits[0, 0])
                for side in ("chosen", "rejected")
            ]
            hits += 1.0 if scores[0] > scores[1] else 0.5 if scores[0] == scores[1] else 0.0
    return hits / len(pairs)


@dataclass
class Refit:
    steps: int
    seconds: float
    loss: float
    before: dict[str, float]
    after: dict[str, float]


def refit(model: Any, tokenizer: Any, data: Split, settings: RewardSettings, work_dir: Path, *, progress: bool = True) -> Refit:
    """Fine-tune ``model`` in place on ``data.train``; agreement with thumbs before and after on both parts."""
    import datasets
    from trl import RewardConfig, RewardTrainer  # type: ignore[attr-defined]

    def measure() -> dict[str, float]:
        return {
            "train": agreement(model, tokenizer, data.train, settings.max_length),
            "held_out": agreement(model, tokenizer, data.held_out, settings.max_length),
        }

    before = measure()
    length = settings.max_length
    rows = [
        {"chosen_ids": _ids(tokenizer, p, "chosen", length), "rejected_ids": _ids(tokenizer, p, "rejected", length)}
        for p in data.train
    ]
    steps = max(1, math.ceil(math.ceil(len(rows) / settings.batch_size) * settings.epochs))
    config = RewardConfig(
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, max_length=None,
        **trainer_args(work_dir, steps, settings.seed, False, progress),
    )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    output, seconds, _ = fit(trainer, None, progress)
    return Refit(output.global_step, seconds, float(output.training_loss), before, measure())
