"""Multi-objective scoring: several scores per candidate, one reward as their weighted sum.

Knows four objectives and how to combine them:
- ``reward_model``: the served reward model (``gateway.score``), whatever it is;
- ``length``: the answer's length in words (a negative weight is a length penalty);
- ``refusal``: 1 when the answer refuses (``REFUSAL``, or the configured patterns), else 0 (a negative weight makes
  refusals lose);
- ``judge``: an LLM as judge on any OpenAI-compatible endpoint, asked whether the answer is correct and helpful; its
  score is P(yes) / (P(yes) + P(no)) from the first answer token's log-probabilities (so any model gives a graded
  score, without parsing free text), or 1 / 0 / 0.5 from the token itself when neither is among them.
The reward is sum(weight x score) over the objectives with a weight other than 0, which alone are computed (a judge
costs a request per candidate). Weights come from ``objectives.weights`` or, per request, ``reward_weights``.
``Weighted`` is a ``Scorer``, so best-of-N, overlapped scoring and pruning use it unchanged; it keeps each answer's
scores for the log and the ``candidates`` extension. Its version is the reward model's under the configured weights
(the deployment's objective) and ``<version>~custom`` under a request's own, so the trainer, which trains on one
reward model's scores, leaves a request's private objective out.
Does not choose, and does not know HTTP beyond the judge's one call.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from gateway.errors import ScorerFailed
from gateway.score import Conversation, Scorer

OBJECTIVES = ("reward_model", "length", "refusal", "judge")
REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I am (?:not able|unable)|I'm (?:not able|unable)|I won't|I will not|as an AI)\b", re.IGNORECASE
)
"""What counts as a refusal unless the config lists patterns (the reward-hacking watch counts refusals with it too)."""
JUDGE_PROMPT = (
    "Here is a conversation and an answer to its last message.\n\n{conversation}\n\nAnswer: {answer}\n\n"
    "Is the answer correct and helpful? Reply with one word: yes or no."
)


def words(answer: str) -> float:
    return float(len(answer.split()))


class Refusals:
    """1.0 for an answer that refuses, else 0.0."""

    def __init__(self, patterns: Sequence[str] | None = None) -> None:
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else REFUSAL

    def __call__(self, answer: str) -> float:
        return 1.0 if self.pattern.search(answer) else 0.0


class Judge:
    """An LLM as judge behind an OpenAI-compatible ``/v1/chat/completions``: one request per answer, all at once."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 10.0, top_logprobs: int = 5, prompt: str = JUDGE_PROMPT) -> None:  # fmt: skip
        self.session, self.url, self.model = session, url.rstrip("/"), model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.top_logprobs, self.prompt = top_logprobs, prompt

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return list(await asyncio.gather(*(self._one(c) for c in conversations)))

    async def _one(self, conversation: Conversation) -> float:
        shown = "\n".join(f"{m['role']}: {m['content']}" for m in conversation.messages)
        body = {
            "model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs,
            "messages": [{"role": "user", "content": self.prompt.format(conversation=shown, answer=conversation.answer)}],
        }  # fmt: skip
        try:
            async with self.session.post(
                f"{self.url}/v1/chat/completions", json=body, headers=self.headers, timeout=self.timeout
            ) as response:
                if response.status != 200:
                    raise ScorerFailed(
                        f"the judge at {self.url} answered HTTP {response.status}: {(await response.text())[:200]}"
                    )
                data = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ScorerFailed(f"the judge at {self.url} failed: {exc.__class__.__name__}") from None
        return verdict(data)


def verdict(completion: Mapping[str, Any]) -> float:
    """P(yes) / (P(yes) + P(no)) over the first token's top log-probabilities (case and spaces ignored); the token
    itself when neither is listed: yes 1, no 0, anything else 0.5."""
    choice = (completion.get("choices") or [{}])[0]
    first = ((choice.get("logprobs") or {}).get("content") or [{}])[0]
    mass = {"yes": 0.0, "no": 0.0}
    for option in first.get("top_logprobs") or ():
        token = str(option.get("token", "")).strip().lower()
        if token in mass and option.get("logprob") is not None:
            mass[token] += math.exp(float(option["logprob"]))
    if mass["yes"] + mass["no"] > 0:
        return mass["yes"] / (mass["yes"] + mass["no"])
    said = str((choice.get("message") or {}).get("content") or "").strip().lower()
    return 1.0 if said.startswith("yes") else 0.0 if said.startswith("no") else 0.5


class Weighted:
    """A ``Scorer``: the weighted sum of the objectives whose weight is not 0; ``scores[answer]``: each one's score."""

    def __init__(self, inner: Scorer, weights: Mapping[str, float], refusals: Refusals, judge: Judge | None,
                 custom: bool = False) -> None:  # fmt: skip
        if weights.get("judge") and judge is None:
            raise ValueError("a judge weight needs objectives.judge.url")
        self.inner, self.refusals, self.judge = inner, refusals, judge
        self.weights = {k: w for k, w in weights.items() if w}
        self.version = f"{inner.version}~custom" if custom else inner.version
        self.scores: dict[str, dict[str, float]] = {}

    async def start(self) -> None:
        return None  # the inner scorer is the service's, started and closed by the lifespan

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        parts: dict[str, list[float]] = {}
        model = self.inner.score(conversations, background=background) if "reward_model" in self.weights else None
        judged = self.judge.score(conversations) if self.judge is not None and "judge" in self.weights else None
        if model is not None or judged is not None:
            done = await asyncio.gather(*(w for w in (model, judged) if w is not None))
            if model is not None:
                parts["reward_model"] = done.pop(0)
            if judged is not None:
                parts["judge"] = done.pop(0)
        if "length" in self.weights:
            parts["length"] = [words(c.answer) for c in conversations]
        if "refusal" in self.weights:
            parts["refusal"] = [self.refusals(c.answer) for c in conversations]
        totals = []
        for k, c in enumerate(conversations):
            scores = {name: values[k] for name, values in parts.items()}
            self.scores[c.answer] = scores
            totals.append(sum(self.weights[name] * score for name, score in scores.items()))
        return totals
