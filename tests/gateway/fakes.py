"""Hand-written fakes of the gateway's I/O seams (generator, scorer, log store) for fast unit tests."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from gateway.errors import GatewayError
from gateway.generate import Candidate, Finished, Generation
from gateway.score import Conversation
from gateway.store.records import Record
from tests.polling import wait_until


class FakeGenerator:
    """Returns ``texts`` as candidates (cycled to N); records what it was asked."""

    def __init__(
        self, texts: Sequence[str], *, error: GatewayError | None = None, delay_s: float = 0.0, finish_gap_s: float = 0.0
    ) -> None:
        """``finish_gap_s``: with ``on_finished``, the candidates finish one by one (last index first), this far apart,
        after ``delay_s``."""
        self.texts = list(texts)
        self.error = error
        self.delay_s = delay_s
        self.word_gap_s = 0.0
        self.gaps: dict[int, float] = {}
        """Candidate (seed % len(texts)) -> its own ``word_gap_s``: a straggler."""
        self.aborted = 0
        self.finish_gap_s = finish_gap_s
        self.calls: list[tuple[dict[str, Any], int]] = []
        self.cancelled = 0
        self.finished_at: list[float] = []
        """When each candidate was handed to ``on_finished`` (``time.monotonic()``)."""

    async def generate(
        self, body: dict[str, Any], n: int, models: dict[str, str] | None = None, on_finished: Finished | None = None
    ) -> Generation:
        self.calls.append((body, n))
        candidates = [
            Candidate(i, self.texts[i % len(self.texts)], "stop", token_ids=[7] * (i + 2), logprobs={"content": []})
            for i in range(n)
        ]
        try:
            await asyncio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            if on_finished is not None:
                for candidate in reversed(candidates):
                    on_finished(candidate)
                    self.finished_at.append(time.monotonic())
                    await asyncio.sleep(self.finish_gap_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Generation(candidates, prompt_tokens=5, completion_tokens=sum(c.token_count for c in candidates), backend="fake")

    async def stream(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        self.calls.append((body, 1))
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        base = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1, "model": "policy"}
        deltas = [{"role": "assistant", "content": ""}, *({"content": w} for w in re.split(r"(?<= )", self.texts[0]))]
        ids = body.get("return_token_ids")
        for k, delta in enumerate(deltas):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **({"token_ids": [k]} if ids else {})}
            yield json.dumps({**base, "choices": [choice], **({"prompt_token_ids": [1, 2]} if ids and k == 0 else {})}).encode()
        yield json.dumps({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}).encode()
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            yield json.dumps({**base, "choices": [], "usage": usage}).encode()
        yield b"[DONE]"

    async def sample(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Candidate ``seed % len(texts)``, one word per chunk (one token id each), ``word_gap_s`` apart; counts samples
        closed before their end in ``aborted``."""
        self.calls.append((body, 1))
        which = int(body.get("seed", 0)) % len(self.texts)
        words = re.split(r"(?<= )", self.texts[which])
        gap = self.gaps.get(which, self.word_gap_s)
        try:
            await asyncio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "backend": "fake"}
            for k, word in enumerate(words):
                await asyncio.sleep(gap)
                last = k == len(words) - 1
                choice = {"index": 0, "delta": {"content": word}, "token_ids": [k], "finish_reason": "stop" if last else None}
                yield {"choices": [choice], "backend": "fake"}
            yield {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(words)}, "backend": "fake"}
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted += 1
            raise

    async def ready(self) -> bool:
        return self.error is None


class FakeScorer:
    """Reward = ``rewards[text]`` (default 0); can be told to fail, or to take ``delay_s``."""

    version = "rm-fake"

    def __init__(self, rewards: dict[str, float], *, fail: bool = False, delay_s: float = 0.0) -> None:
        self.rewards = rewards
        self.fail = fail
        self.delay_s = delay_s
        self.seen: list[Conversation] = []

    async def start(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        if self.fail:
            from gateway.errors import ScorerFailed

            raise ScorerFailed("the reward model failed: RuntimeError: boom")
        await asyncio.sleep(self.delay_s)
        self.seen.extend(conversations)
        return [self.rewards.get(c.answer, 0.0) for c in conversations]

    async def ready(self) -> bool:
        return not self.fail

    async def close(self) -> None:
        return None


class FakeStore:
    """Keeps written records in a list; ``down`` makes writes fail like an unreachable database."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.down = False
        self.writes = 0
        self._lock = threading.Lock()

    def write(self, records: Sequence[Record]) -> None:
        if self.down:
            raise ConnectionError("the database is down")
        with self._lock:
            self.writes += 1
            self.records.extend(records)

    def ping(self) -> bool:
        return not self.down

    def refused(self, exc: Exception) -> bool:
        return isinstance(exc, ValueError)

    def close(self) -> None:
        return None

    def wait_for(self, predicate: Callable[[list[Record]], bool], timeout_s: float = 5.0) -> list[Record]:
        """The records once ``predicate`` holds for them (the writer is asynchronous)."""
        wait_until(lambda: predicate(self.snapshot()), timeout_s, "timed out waiting for the records")
        return self.snapshot()

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)
