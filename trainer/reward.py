"""Reward-model refit: Bradley–Terry on what users' thumbs say (TRL ``RewardTrainer``).

Knows how thumbs become reward-model training data and how a refit is judged. Two kinds of
pairs (``trainer.reward.pairs``):
- ``thumb_vs_thumb`` (default): both sides carry a thumb and the thumbs differ, an answer
  thumbed up against one thumbed down, each with its own prompt (the same prompt when one
  was asked twice, else another: Bradley–Terry over such pairs is the ranking loss of a
  score that tells answers people like from those they do not). Only what a user judged
  enters: a thumb is on the answer that was served, so nothing the reward model itself
  ranked orders a pair. At most ``max_pairs`` are drawn, with the round's seed.
- ``thumb_vs_candidates``: the thumbed answer against the other candidates of its request
  (``trainer.pairs``' rules), the side the thumb did not judge ranked by the reward model.
Thumbs are split by completion before pairing (every ``holdout_every``-th completion by a
hash of its id is held out, and pairs are made within each part, so no answer is on both
sides of the split); the current reward model is fine-tuned (all weights; it is small) on
the training part, and its **agreement with thumbs**, the share of pairs it orders as the
thumbs do, is measured before and after on both parts. A refit whose held-out agreement
falls is registered but not made current. Conversations are rendered and tokenised exactly
as the gateway scores them (``gateway.score.render``). Does not read the log
(``trainer.round`` does).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.store.records import CompletionRecord, FeedbackRecord
from trainer.adapter import fit, trainer_args
from trainer.pairs import assistant, prompt_of
from trainer.settings import RewardSettings

Labelled = tuple[CompletionRecord, FeedbackRecord | None]


@dataclass
class Split:
    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]


def held_out(completion_id: str, every: int) -> bool:
    """Whether a completion's thumbs and pairs are held out: every ``every``-th by a hash of its id (stable)."""
    return int(hashlib.sha256(completion_id.encode()).hexdigest(), 16) % every == 0


def split(pairs: Sequence[dict[str, Any]], every: int) -> Split:
    """Held out: the pairs of every ``every``-th completion by a hash of its id (stable across refits)."""
    out = Split([], [])
    for pair in pairs:
        (out.held_out if held_out(str(pair["completion_id"]), every) else out.train).append(pair)
    return out


def thumb_pairs(labelled: Iterable[Labelled], every: int, max_pairs: int, seed: int) -> Split:
    """Pairs of a served answer thumbed up and one thumbed down, made within the training and the held-out part of the
    thumbs; each part at most ``max_pairs`` (the held-out part a ``1 / every`` share of it), drawn with ``seed``."""
    parts: dict[bool, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {True: ([], []), False: ([], [])}
    for record, thumb in labelled:
        served = next((c for c in record.candidates if c.chosen), None)
        if thumb is None or served is None:
            continue
        answer = {"id": record.id, "prompt": prompt_of(record), "text": served.text}
        ups, downs = parts[held_out(record.id, every)]
        (ups if thumb.thumb == "up" else downs).append(answer)
    rng = random.Random(seed)

    def pairs(ups: list[dict[str, Any]], downs: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        combos = [(u, d) for u in ups for d in downs]
        if len(combos) > limit:
            combos = rng.sample(combos, limit)
        return [
            {"prompt": u["prompt"], "rejected_prompt": d["prompt"], "chosen": assistant(u["text"]),
             "rejected": assistant(d["text"]), "completion_id": f"{u['id']}|{d['id']}", "source": "thumb",
             "same_prompt": u["prompt"] == d["prompt"]}
            for u, d in combos
        ]  # fmt: skip

    return Split(pairs(*parts[False], max_pairs), pairs(*parts[True], max(1, max_pairs // every)))


def _ids(tokenizer: Any, pair: dict[str, Any], side: str, max_length: int) -> list[int]:
    """One side of a pair, rendered with its own prompt (``rejected_prompt`` when the sides' prompts differ)."""
    from gateway.score import Conversation, render

    prompt = pair.get(f"{side}_prompt") or pair["prompt"]
    text = render(tokenizer, Conversation(prompt, pair[side][-1]["content"]))
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
