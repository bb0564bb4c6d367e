"""Scoring overlapped with generation (``scorer.overlap``): each candidate is scored as soon as it is finished, while the
others decode; the choice, the rewards and the log are what scoring all of them at the end gives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi.testclient import TestClient

from gateway.errors import BackendFailed
from gateway.score import Conversation
from gateway.store.records import CompletionRecord
from tests.gateway.conftest import ANSWERS, REWARDS
from tests.gateway.fakes import FakeGenerator, FakeScorer, FakeStore
from tests.polling import wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "n_candidates": 4,
        "return_candidates": True}  # fmt: skip


class TimedScorer(FakeScorer):
    """Records when each call started and what it scored."""

    def __init__(self, rewards: dict[str, float], **kwargs: Any) -> None:
        super().__init__(rewards, **kwargs)
        self.calls: list[tuple[float, list[str]]] = []
        self.cancelled = 0

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        self.calls.append((time.monotonic(), [c.answer for c in conversations]))
        try:
            return await super().score(conversations, background=background)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_candidates_are_scored_while_the_others_decode_and_the_choice_is_the_same(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    answers: dict[bool, Any] = {}
    for overlap in (True, False):
        generator = FakeGenerator(ANSWERS, finish_gap_s=0.05)
        scorer = TimedScorer(REWARDS)
        client = make_client(generator=generator, scorer=scorer, scorer_settings={"overlap": overlap})
        response = client.post(CHAT, json=BODY)
        assert response.status_code == 200, response.text
        answers[overlap] = response.json()
        if overlap:  # one call per candidate, each made as that candidate finished, before the last had
            assert [answer for _, (answer,) in scorer.calls] == ANSWERS[::-1]
            assert all(called >= finished for (called, _), finished in zip(scorer.calls, generator.finished_at, strict=True))
            assert scorer.calls[-2][0] < generator.finished_at[-1]
        else:  # one call for all four, after generation
            assert [answers for _, answers in scorer.calls] == [ANSWERS]
    for key in ("choices", "candidates"):
        assert answers[True][key] == answers[False][key]
    assert answers[True]["choices"][0]["message"]["content"] == max(REWARDS, key=REWARDS.__getitem__)
    records = store.wait_for(lambda records: len(records) == 2)
    logged = [
        [(c.text, c.reward, c.chosen) for c in record.candidates] for record in records if isinstance(record, CompletionRecord)
    ]
    assert len(logged) == 2
    assert logged[0] == logged[1]


def test_a_generation_that_fails_after_some_candidates_drops_their_scoring(
    make_client: Callable[..., TestClient],
) -> None:
    class FailingLate(FakeGenerator):
        async def generate(self, body: dict[str, Any], n: int, models: Any = None, on_finished: Any = None) -> Any:
            on_finished(await self._one(0))
            await asyncio.sleep(0.05)
            raise BackendFailed("the model backend failed: stream cut")

        async def _one(self, index: int) -> Any:
            from gateway.generate import Candidate

            return Candidate(index, ANSWERS[index], "stop")

    scorer = TimedScorer(REWARDS, delay_s=30)
    client = make_client(generator=FailingLate(ANSWERS), scorer=scorer)
    response = client.post(CHAT, json=BODY)
    assert response.status_code == 502
    wait_until(lambda: scorer.cancelled == 1, 5.0, "the started scoring was not cancelled")
    assert len(scorer.calls) == 1


def test_a_reward_model_failure_during_overlap_follows_on_failure(make_client: Callable[..., TestClient]) -> None:
    client = make_client(generator=FakeGenerator(ANSWERS, finish_gap_s=0.01), scorer=FakeScorer(REWARDS, fail=True),
                         scorer_settings={"on_failure": "fail_open"})  # fmt: skip
    response = client.post(CHAT, json=BODY)
    assert response.status_code == 200
    assert response.headers["x-bon-degraded"] == "scorer_failed"
    assert [c["reward"] for c in response.json()["candidates"]] == [None] * 4
    closed = make_client(generator=FakeGenerator(ANSWERS, finish_gap_s=0.01), scorer=FakeScorer(REWARDS, fail=True))
    assert closed.post(CHAT, json=BODY).status_code == 503
