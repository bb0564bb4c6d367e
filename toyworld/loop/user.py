"""The simulated user: an outside client of the gateway that asks the toy world's training prompts and, at a
stated rate, gives a thumb judged from the hidden gold reward with noise.

It calls ``/v1/chat/completions`` and ``/v1/feedback`` under its own API key, like any client
(a 429 on feedback is waited out, as its ``Retry-After`` says), and declares each prompt's task
kind (``metadata.task``: add, capital...), as a client that knows what it asks would, so
adaptive N can tell kinds apart. It counts the candidates the gateway generated for it
(``x-bon-n``, and ``x-bon-adaptive``: which rule chose N) and the gold of what it was served.
Knows the gold reward and the noise model of its judgement; knows nothing about the gateway's
internals, the log or training.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from toyworld.gold import gold_reward
from toyworld.world import parse_prompt


@dataclass(frozen=True)
class Judgement:
    """How the simulated user turns an answer's gold reward into a thumb."""

    rate: float = 0.0
    """Share of answers that get a thumb (0: the reward-model-only arm)."""
    noise: float = 0.1
    """Standard deviation of the Gaussian noise added to gold before thresholding."""
    threshold: float = 0.6
    """Thumb up when gold + noise reaches this (a correct answer alone earns 0.6)."""


@dataclass
class Traffic:
    sent: int = 0
    failed: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    feedback_waits: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    """Candidates generated for the answered requests (the sum of their ``x-bon-n``)."""
    adaptive: dict[str, int] = field(default_factory=dict)
    """Answered requests by the adaptive rule that chose their N (``x-bon-adaptive``; absent: adaptive N was off)."""
    adaptive_candidates: dict[str, int] = field(default_factory=dict)
    """Their candidates, by the same rule."""
    golds: int = 0
    """Answers whose gold reward was read (runs recorded before it was: 0)."""
    gold_sum: float = 0.0
    """Sum of the gold reward of those answers (with ``gold_squares``: their mean and its interval)."""
    gold_squares: float = 0.0

    @property
    def thumbs(self) -> int:
        return self.thumbs_up + self.thumbs_down

    @property
    def answered(self) -> int:
        return self.sent - self.failed

    def merge(self, other: Traffic) -> None:
        self.sent += other.sent
        self.failed += other.failed
        self.thumbs_up += other.thumbs_up
        self.thumbs_down += other.thumbs_down
        self.feedback_waits += other.feedback_waits
        _add(self.versions, other.versions)
        self.candidates += other.candidates
        _add(self.adaptive, other.adaptive)
        _add(self.adaptive_candidates, other.adaptive_candidates)
        self.golds += other.golds
        self.gold_sum += other.gold_sum
        self.gold_squares += other.gold_squares


def _add(counts: dict[str, int], more: dict[str, int]) -> None:
    for key, count in more.items():
        counts[key] = counts.get(key, 0) + count


class SimulatedUser:
    def __init__(
        self, session: aiohttp.ClientSession, url: str, api_key: str, model: str, judgement: Judgement, seed: int
    ) -> None:
        self._session = session
        self._url = url
        self._headers = {"authorization": f"Bearer {api_key}"}
        self._model = model
        self._judgement = judgement
        self._rng = random.Random(seed)
        self._seed = seed
        self._asked = 0

    async def converse(self, prompts: Sequence[str], concurrency: int, max_tokens: int) -> Traffic:
        """Ask every prompt (``concurrency`` at a time); thumb a ``judgement.rate`` share of the answers."""
        traffic = Traffic()
        # decide up front which answers get a thumb and with what noise, so concurrency does not change the draw
        plan = []
        for prompt in prompts:
            self._asked += 1  # each request from another end user (the OpenAI `user` field): canaries split by user
            plan.append((prompt, f"user-{self._seed}-{self._asked}", self._rng.random() < self._judgement.rate,
                         self._rng.gauss(0.0, self._judgement.noise)))  # fmt: skip
        queue: asyncio.Queue[tuple[str, str, bool, float]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                prompt, end_user, thumb, noise = queue.get_nowait()
                await self._one(prompt, end_user, thumb, noise, max_tokens, traffic)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return traffic

    async def _one(self, prompt: str, end_user: str, thumb: bool, noise: float, max_tokens: int, traffic: Traffic) -> None:
        body: dict[str, object] = {
            "model": self._model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "user": end_user,
        }  # fmt: skip
        task = parse_prompt(prompt)
        if task is not None:
            body["metadata"] = {"task": task.kind.value}
        traffic.sent += 1
        async with self._session.post(f"{self._url}/v1/chat/completions", json=body, headers=self._headers) as response:
            if response.status != 200:
                traffic.failed += 1
                return
            data = await response.json()
            version = response.headers.get("x-policy-version", "?")
            n = int(response.headers.get("x-bon-n", "1"))
            traffic.candidates += n
            if (reason := response.headers.get("x-bon-adaptive")) is not None:
                _add(traffic.adaptive, {reason: 1})
                _add(traffic.adaptive_candidates, {reason: n})
        _add(traffic.versions, {version: 1})
        answer = data["choices"][0]["message"]["content"] or ""
        gold = gold_reward(prompt, answer)
        traffic.golds += 1
        traffic.gold_sum += gold
        traffic.gold_squares += gold * gold
        if not thumb:
            return
        up = gold + noise >= self._judgement.threshold
        feedback = {"completion_id": data["id"], "thumb": "up" if up else "down"}
        while True:
            async with self._session.post(f"{self._url}/v1/feedback", json=feedback, headers=self._headers) as response:
                if response.status == 429:  # within the feedback limits: wait as told
                    traffic.feedback_waits += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                if response.status == 200:
                    traffic.thumbs_up += up
                    traffic.thumbs_down += not up
                return
