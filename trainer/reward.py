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
Thumbs are split by completion before pairing, each thumb's side on its own: every
``holdout_every``-th completion thumbed up and every ``holdout_every_down``-th thumbed down, by a
hash of its id (stable, so an answer trained on in one refit is never held out in a later one).
Downs are the scarce side (at an up-rate of ~0.9 a round brings a few), so more of them are held
out. Pairs are made within each part, so no answer is on both sides of the split. The current
reward model is fine-tuned (all weights; it is small) on the training part, and its **agreement
with thumbs**, the share of pairs it orders as the thumbs do, is measured before and after on both
parts. The check (``Check``): the held-out change, after minus before, with DeLong's interval over
the held-out answers (``gateway.intervals.crossed``): each answer sits in many pairs, so sixteen
ups against one down is one down's evidence, not sixteen pairs'. A refit is made current only when
at least ``min_held_out`` answers stand on each side and (``accept``) the interval's upper bound is
not below ``-margin`` (``no_loss``, the default: refused on evidence that it lost) or its lower
bound is above ``-margin`` (``gain``: made current on evidence that it gained); otherwise it is
registered but not made current. Conversations are rendered and tokenised exactly as the gateway
scores them (``gateway.score.render``). Does not read the log (``trainer.round`` does).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from gateway.intervals import Interval, crossed
from gateway.store.records import CompletionRecord, FeedbackRecord
from trainer.adapter import fit, trainer_args
from trainer.pairs import assistant, prompt_of
from trainer.settings import Accept, RewardSettings

Labelled = tuple[CompletionRecord, FeedbackRecord | None]


@dataclass
class Split:
    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]


def held_out(completion_id: str, every: int) -> bool:
    """Whether a completion's thumbs and pairs are held out: every ``every``-th by a hash of its id (stable)."""
    return int(hashlib.sha256(completion_id.encode()).hexdigest(), 16) % every == 0


def split(pairs: Sequence[dict[str, Any]], every: int, every_down: int) -> Split:
    """Held out: the pairs of every ``every``-th completion thumbed up and every ``every_down``-th thumbed down, by a
    hash of its id (stable across refits)."""
    out = Split([], [])
    for pair in pairs:
        k = every_down if pair.get("thumb") == "down" else every
        (out.held_out if held_out(str(pair["completion_id"]), k) else out.train).append(pair)
    return out


def thumb_pairs(labelled: Iterable[Labelled], every: int, every_down: int, max_pairs: int, seed: int) -> Split:
    """Pairs of a served answer thumbed up and one thumbed down, made within the training and the held-out part of the
    thumbs (``split``'s rule): the training part at most ``max_pairs`` drawn with ``seed``, the held-out part every
    up against every down (the check's answers are its units) up to ``max_pairs``."""
    parts: dict[bool, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {True: ([], []), False: ([], [])}
    for record, thumb in labelled:
        served = next((c for c in record.candidates if c.chosen), None)
        if thumb is None or served is None:
            continue
        answer = {"id": record.id, "prompt": prompt_of(record), "text": served.text}
        up = thumb.thumb == "up"
        ups, downs = parts[held_out(record.id, every if up else every_down)]
        (ups if up else downs).append(answer)
    rng = random.Random(seed)

    def pairs(ups: list[dict[str, Any]], downs: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        combos = [(u, d) for u in ups for d in downs]
        if len(combos) > limit:
            combos = rng.sample(combos, limit)
        return [
            {"prompt": u["prompt"], "rejected_prompt": d["prompt"], "chosen": assistant(u["text"]),
             "rejected": assistant(d["text"]), "completion_id": f"{u['id']}|{d['id']}", "source": "thumb",
             "same_prompt": u["prompt"] == d["prompt"], "chosen_id": u["id"], "rejected_id": d["id"]}
            for u, d in combos
        ]  # fmt: skip

    return Split(pairs(*parts[False], max_pairs), pairs(*parts[True], max_pairs))


def members(pair: dict[str, Any], index: int) -> tuple[str, str]:
    """The answers a pair compares, as the check's units: thumb-vs-thumb pairs name theirs; a thumbed answer against
    its request's candidates is its completion's served answer (one unit per completion) against the candidate, a unit
    of its own per pair (``index``)."""
    if "chosen_id" in pair:
        return str(pair["chosen_id"]), str(pair["rejected_id"])
    completion, text = str(pair["completion_id"]), pair["rejected"][-1]["content"]
    served = f"{completion}#served"
    if pair.get("thumb") == "down":  # the served answer was thumbed down: it is the rejected side
        return f"{completion}#{pair['chosen'][-1]['content']}#{index}", served
    return served, f"{completion}#{text}#{index}"


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


def hits(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], max_length: int) -> list[float]:
    """Per pair: 1 if scored chosen > rejected, ½ for a tie, else 0 (each distinct answer scored once)."""
    import torch

    model.eval()
    scores: dict[tuple[int, ...], float] = {}

    def score(ids: list[int]) -> float:
        key = tuple(ids)
        if key not in scores:
            scores[key] = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        return scores[key]

    out: list[float] = []
    with torch.inference_mode():
        for pair in pairs:
            chosen, rejected = (score(_ids(tokenizer, pair, side, max_length)) for side in ("chosen", "rejected"))
            out.append(1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0)
    return out


def agreement(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], max_length: int) -> float:
    """Share of pairs scored chosen > rejected (ties count half); NaN without pairs."""
    scored = hits(model, tokenizer, pairs, max_length)
    return sum(scored) / len(scored) if scored else math.nan


@dataclass(frozen=True)
class Check:
    """The held-out part before and after a refit: agreement with thumbs, and the change (after − before) with
    DeLong's interval over the answers (``confidence``, two-sided)."""

    before: float
    after: float
    change: Interval
    pairs: int
    chosen: int
    """Distinct held-out answers on the chosen side (thumb-vs-thumb: the answers thumbed up)."""
    rejected: int
    """Distinct held-out answers on the rejected side (thumb-vs-thumb: the answers thumbed down)."""
    confidence: float

    @classmethod
    def of(cls, pairs: Sequence[dict[str, Any]], before: Sequence[float], after: Sequence[float], confidence: float) -> Check:
        keys = [members(pair, i) for i, pair in enumerate(pairs)]
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        change = crossed([a - b for a, b in zip(after, before, strict=True)], [k[0] for k in keys], [k[1] for k in keys], z)
        return cls(_mean(before), _mean(after), change, len(pairs), len({k[0] for k in keys}), len({k[1] for k in keys}),
                   confidence)  # fmt: skip

    def verdict(self, min_answers: int, margin: float, accept: Accept) -> str | None:
        """None when the refit may be made current, else why not. ``no_loss``: unless the change's upper bound is below
        ``-margin`` (shown to lose more than the margin); ``gain``: only when its lower bound is above ``-margin``."""
        if min(self.chosen, self.rejected) < min_answers:
            return (f"too few held-out answers to judge ({self.chosen} on the chosen side, {self.rejected} on the "
                    f"rejected; trainer.reward.min_held_out is {min_answers})")  # fmt: skip
        if accept == "no_loss" and self.change.high < -margin:
            return f"the change's upper bound is below {0.0 - margin:+.3f}: it lost agreement"
        if accept == "gain" and not self.change.low > -margin:
            return f"the change's lower bound is not above {0.0 - margin:+.3f}"
        return None

    def describe(self) -> str:
        """``0.462 -> 0.839, change +0.377 [+0.201, +0.553] over 41 chosen and 9 rejected answers (90%)``."""
        return (f"{self.before:.3f} -> {self.after:.3f}, change {self.change.signed()} over {self.chosen} chosen and "
                f"{self.rejected} rejected answers ({self.confidence:.0%})")  # fmt: skip


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class Refit:
    steps: int
    seconds: float
    loss: float
    train_before: float
    """Agreement with thumbs on the training pairs before the refit (the held-out part's figures are in ``check``)."""
    train_after: float
    check: Check


def refit(model: Any, tokenizer: Any, data: Split, settings: RewardSettings, work_dir: Path, *, progress: bool = True) -> Refit:
    """Fine-tune ``model`` in place on ``data.train``; agreement with thumbs before and after on both parts."""
    import datasets
    from trl import RewardConfig, RewardTrainer  # type: ignore[attr-defined]

    def measure() -> tuple[float, list[float]]:
        scored = hits(model, tokenizer, data.held_out, settings.max_length)
        return agreement(model, tokenizer, data.train, settings.max_length), scored

    train_before, held_before = measure()
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
    train_after, held_after = measure()
    check = Check.of(data.held_out, held_before, held_after, settings.confidence)
    return Refit(output.global_step, seconds, float(output.training_loss), train_before, train_after, check)
