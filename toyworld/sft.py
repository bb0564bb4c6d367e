"""Supervised fine-tuning of the tiny policy from scratch on the noisy answer mix.

Knows how to turn (prompt, answer) pairs into token ids with the loss on the answer
only, and runs the training loop. The mix itself (how often answers are wrong, rude,
rambling, truncated) lives in ``answers.py``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from toyworld.answers import Mix, sample_answer
from toyworld.models import autocast, train_steps
from toyworld.tokenizer import render_chat
from toyworld.world import Task
from trainer.batching import bucketed_batches, pad_right

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    steps: int
    batch_size: int = 16
    lr: float = 3e-3
    plain_fraction: float = 0.15
    """Share of examples that are the bare answer ("12."): cheap, short, all signal on the value."""
    balance_kinds: bool = False
    """Draw each example's task kind uniformly instead of by the world's traffic mix, so the
    rarer arithmetic kinds (the hardest for a tiny model) get as many steps as look-ups."""


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the chat-templated prompt, ending in the assistant header."""
    text = render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def answer_ids(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer followed by the end-of-turn token."""
    encoded: list[list[int]] = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [[*ids, tokenizer.eos_token_id] for ids in encoded]


def pick_tasks(tasks: Sequence[Task], count: int, balance_kinds: bool, rng: random.Random) -> list[Task]:
    """``count`` tasks drawn with replacement; with ``balance_kinds``, each kind equally often."""
    if not balance_kinds:
        return [rng.choice(tasks) for _ in range(count)]
    by_kind: dict[str, list[Task]] = {}
    for task in tasks:
        by_kind.setdefault(task.kind.value, []).append(task)
    groups = [by_kind[kind] for kind in sorted(by_kind)]
    return [rng.choice(rng.choice(groups)) for _ in range(count)]


def build_examples(
    tasks: Sequence[Task], tokenizer: PreTrainedTokenizerBase, count: int, mix: Mix, config: SFTConfig, rng: random.Random
) -> list[tuple[list[int], int]]:
    """``count`` examples as (token ids, prompt length), answers drawn from ``mix`` or bare."""
    picked = pick_tasks(tasks, count, config.balance_kinds, rng)
    answers = [f"{task.answer}." if rng.random() < config.plain_fraction else sample_answer(task, rng, mix)[0] for task in picked]
    cache: dict[str, list[int]] = {}
    examples = []
    for task, completion in zip(picked, answer_ids(tokenizer, answers), strict=True):
        prompt = cache.setdefault(task.prompt, prompt_ids(tokenizer, task.prompt))
        examples.append((prompt + completion, len(prompt)))
    return examples


def _batches(
    examples: list[tuple[list[int], int]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, ...]]:
    lengths = [len(ids) for ids, _ in examples]
    while True:
        for batch in bucketed_batches(lengths, batch_size, rng):
            ids, mask = pad_right([examples[i][0] for i in batch], pad_id)
            labels = ids.clone()
            labels[mask == 0] = IGNORE
            for row, i in enumerate(batch):
                labels[row, : examples[i][1]] = IGNORE
            yield ids, mask, labels


def train_sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    config: SFTConfig,
    mix: Mix,
    seed: int,
) -> list[float]:
    """Train ``model`` in place; returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = build_examples(tasks, tokenizer, config.steps * config.batch_size, mix, config, rng)
    device = next(model.parameters()).device
    batches = _batches(examples, config.batch_size, tokenizer.pad_token_id, rng)

    def loss_fn(batch: object) -> torch.Tensor:
        ids, mask, labels = (t.to(device) for t in batch)  # type: ignore[attr-defined]
        with autocast(device):
            loss: torch.Tensor = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss

    return train_steps(model, batches, loss_fn, config.steps, config.lr, desc="SFT policy")
