"""The tiny reward model: Bradley-Terry on noisy, length-biased preference labels.

Knows how preference labels are made from the gold reward (with label noise and a mild
bias towards longer answers, so the model is a useful but imperfect proxy, as real
reward models are), which pairs it trains on (the policy's own samples plus
constructed minimal pairs), the Bradley-Terry loss, and how to score conversations.

The gold reward is read only here, to *label* training pairs, as human raters would;
the reward model itself sees text and labels, never the gold function.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch.nn.functional import logsigmoid
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerBase

from toyworld.answers import Fault, Style, render
from toyworld.gold import gold_reward
from toyworld.models import autocast, train_steps
from toyworld.tokenizer import render_chat
from toyworld.world import Task
from trainer.batching import bucketed_batches, pad_right


@dataclass(frozen=True)
class LabelNoise:
    """How raters err: P(a preferred) = sigmoid((gold_a - gold_b) / temperature + length_bias * (words_a - words_b))."""

    temperature: float = 0.1
    length_bias: float = 0.02

    def prefers_first(self, gold_a: float, gold_b: float, words_a: int, words_b: int, rng: random.Random) -> bool:
        logit = (gold_a - gold_b) / self.temperature + self.length_bias * (words_a - words_b)
        return rng.random() < 1.0 / (1.0 + math.exp(-logit))


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RewardConfig:
    steps: int
    batch_pairs: int = 16
    lr: float = 5e-4
    center_coef: float = 0.01
    """TRL's ``center_rewards_coefficient``: keeps rewards near zero without changing their order."""


def label_pair(prompt: str, a: str, b: str, noise: LabelNoise, rng: random.Random) -> Pair | None:
    """A rater's label for answers ``a`` and ``b``; None when they are the same text."""
    if a == b:
        return None
    ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
    if noise.prefers_first(ga, gb, len(a.split()), len(b.split()), rng):
        return Pair(prompt, a, b)
    return Pair(prompt, b, a)


def pairs_from_samples(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], noise: LabelNoise, rng: random.Random
) -> list[Pair]:
    """Labelled pairs among each prompt's sampled answers (distinct texts only)."""
    pairs = []
    for prompt, answers in zip(prompts, samples, strict=True):
        for a, b in combinations(sorted(set(answers)), 2):
            pair = label_pair(prompt, a, b, noise, rng)
            if pair is not None:
                pairs.append(pair)
    return pairs


def minimal_pair(task: Task, kind: str, rng: random.Random) -> tuple[str, str]:
    """Two answers that differ in correctness only, in style only, or in both (``kind``)."""
    styles = list(Style)
    style_a = rng.choice(styles)
    style_b = style_a if kind == "correctness" else rng.choice([s for s in styles if s is not style_a])
    fault_a = Fault.NONE
    fault_b = Fault.NONE if kind == "style" else rng.choice([Fault.WRONG, Fault.TRUNCATED])
    seed = rng.getrandbits(32)
    return render(task, style_a, fault_a, random.Random(seed)), render(task, style_b, fault_b, random.Random(seed))


PAIR_KINDS = ("correctness", "style", "both")


def constructed_pairs(tasks: Sequence[Task], count: int, noise: LabelNoise, rng: random.Random) -> list[Pair]:
    pairs: list[Pair] = []
    while len(pairs) < count:
        task = rng.choice(tasks)
        a, b = minimal_pair(task, rng.choice(PAIR_KINDS), rng)
        pair = label_pair(task.prompt, a, b, noise, rng)
        if pair is not None:
            pairs.append(pair)
    return pairs


def conversation_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> list[int]:
    """What the reward model reads: the whole chat-templated conversation."""
    text = render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _pair_batches(
    encoded: list[tuple[list[int], list[int]]], batch_pairs: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    lengths = [max(len(c), len(r)) for c, r in encoded]
    while True:
        for batch in bucketed_batches(lengths, batch_pairs, rng):
            seqs = [encoded[i][0] for i in batch] + [encoded[i][1] for i in batch]
            yield pad_right(seqs, pad_id)


def train_reward_model(
    rm: LlamaForSequenceClassification, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], config: RewardConfig, seed: int
) -> list[float]:
    """Bradley-Terry training in place: loss = -log sigmoid(r_chosen - r_rejected)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [
        (conversation_ids(tokenizer, p.prompt, p.chosen), conversation_ids(tokenizer, p.prompt, p.rejected)) for p in pairs
    ]
    device = next(rm.parameters()).device
    batches = _pair_batches(encoded, config.batch_pairs, tokenizer.pad_token_id, rng)

    def loss_fn(batch: object) -> torch.Tensor:
        ids, mask = (t.to(device) for t in batch)  # type: ignore[attr-defined]
        with autocast(device):
            rewards = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        loss = -logsigmoid(chosen - rejected).mean()
        return loss + config.center_coef * ((chosen + rejected) ** 2).mean()

    return train_steps(rm, batches, loss_fn, config.steps, config.lr, desc="reward model")


def score(
    rm: LlamaForSequenceClassification,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 256,
) -> list[float]:
    """Reward of each (prompt, answer) conversation, in input order."""
    device = next(rm.parameters()).device
    rm.eval()
    encoded = [conversation_ids(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    rewards = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_right([encoded[i] for i in chunk], tokenizer.pad_token_id)
        with torch.no_grad(), autocast(device):
            values = rm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.squeeze(-1).float()
        for i, value in zip(chunk, values.tolist(), strict=True):
            rewards[i] = value
    return rewards
