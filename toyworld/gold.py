"""The hidden gold reward: the toy world's ground truth of answer quality.

Scores correctness first, then manners, then concision::

    gold = 0.60 * correct + 0.25 * polite + 0.15 * concise        (each in [0, 1])

It reads only the prompt's text and the completion's text, so any answer (a policy's
sample years of drift later included) can be scored. It is used to build training data
and to *evaluate*; the serving path, the reward model and the trainer's learning never
call it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from toyworld.world import Kind, capitals, parse_prompt

W_CORRECT = 0.60
W_POLITE = 0.25
W_CONCISE = 0.15

CONCISE_WORDS = 16
"""Answers up to this many words are fully concise."""
RAMBLING_WORDS = 32
"""Answers of this many words or more get no concision credit."""

RUDE_MARKERS = (
    "ugh",
    "seriously?",
    "obviously",
    "silly question",
    "duh",
    "figure it out yourself",
    "keep up",
    "waste my time",
    "stupid",
    "whatever",
    "shut up",
)
POLITE_MARKERS = (
    "sure",
    "happy to help",
    "of course",
    "great question",
    "certainly",
    "hope this helps",
    "let me know",
    "thanks",
    "thank you",
    "please",
    "glad",
)

_NUMBER_AT_END = re.compile(r"(\d+)\s*(?=[.!?]|$)")


@dataclass(frozen=True)
class GoldScore:
    correct: float
    polite: float
    concise: float

    @property
    def total(self) -> float:
        return W_CORRECT * self.correct + W_POLITE * self.polite + W_CONCISE * self.concise


def _contains(text: str, marker: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(marker)}(?![a-z])", text) is not None


def final_answer(kind: Kind, completion: str) -> str | None:
    """The answer a reader takes away: the last value that ends a sentence (or the text)."""
    text = completion.strip()
    if kind is Kind.CAPITAL:
        names = "|".join(sorted(capitals()))
        found = re.findall(rf"\b({names})\b\s*(?=[.!?]|$)", text)
    else:
        found = _NUMBER_AT_END.findall(text)
    return found[-1] if found else None


def correctness(prompt: str, completion: str) -> float:
    task = parse_prompt(prompt)
    if task is None:
        return 0.0
    return 1.0 if final_answer(task.kind, completion) == task.answer else 0.0


def politeness(completion: str) -> float:
    text = completion.lower()
    if any(_contains(text, m) for m in RUDE_MARKERS):
        return 0.0
    if any(_contains(text, m) for m in POLITE_MARKERS):
        return 1.0
    return 0.5


def concision(completion: str) -> float:
    words = completion.split()
    if not words:
        return 0.0
    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", completion) if len(s.split()) > 2]
    if len(sentences) != len(set(sentences)):
        return 0.0
    extra = len(words) - CONCISE_WORDS
    if extra <= 0:
        return 1.0
    return max(0.0, 1.0 - extra / (RAMBLING_WORDS - CONCISE_WORDS))


def gold_score(prompt: str, completion: str) -> GoldScore:
    if not completion.strip():
        return GoldScore(0.0, 0.0, 0.0)
    return GoldScore(correctness(prompt, completion), politeness(completion), concision(completion))


def last_user_text(messages: Sequence[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def gold_reward(prompt: str | Sequence[dict[str, str]], completion: str) -> float:
    """Gold reward of ``completion`` for ``prompt`` (the user's text or chat messages)."""
    text = prompt if isinstance(prompt, str) else last_user_text(prompt)
    return gold_score(text, completion).total
