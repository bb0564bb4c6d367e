"""Early-pruned best-of-N (``selection: prune``) on fakes: the weakest partial answers are aborted at each checkpoint,
the answer is the best finished one, and every candidate is logged, pruned ones marked so the trainer leaves them out."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionChunk

from gateway.score import Conversation
from gateway.store.records import PRUNED, CompletionRecord
from tests.gateway.fakes import FakeGenerator, FakeScorer, FakeStore

CHAT = "/v1/chat/completions"
# candidate i is text i (its seed is the request's seed + i); a word is a token
TEXTS = [
    "good good good good good good good good good good.",
    "bad bad bad bad bad bad bad bad bad bad bad bad.",
    "good bad good bad good bad good bad good bad good bad.",
    "bad good bad good bad good bad good bad good bad good.",
]
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "Say something good."}], "n_candidates": 4,
        "return_candidates": True, "seed": 0}  # fmt: skip


class WordScorer(FakeScorer):
    """Reward: good words minus bad words, of whatever part of an answer it is shown."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__({}, **kwargs)
        self.batches: list[list[str]] = []

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        await super().score(conversations, background=background)
        self.batches.append([c.answer for c in conversations])
        return [float(c.answer.count("good") - c.answer.count("bad")) for c in conversations]


def _pruning(make_client: Callable[..., TestClient], **overrides: Any) -> tuple[TestClient, FakeGenerator, WordScorer]:
    generator = FakeGenerator(TEXTS)
    generator.word_gap_s = 0.01
    scorer = WordScorer()
    prune = {"every_tokens": 2, "keep": 0.5, "min_keep": 1}
    client = make_client(generator=generator, scorer=scorer, selection="prune", prune=prune, **overrides)
    return client, generator, scorer


def test_the_weakest_are_aborted_and_the_best_finished_answer_returned(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    client, generator, scorer = _pruning(make_client)
    response = client.post(CHAT, json=BODY)
    assert response.status_code == 200, response.text
    assert response.headers["x-bon-selection"] == "prune"
    body = response.json()
    assert body["choices"][0]["message"]["content"] == TEXTS[0]
    assert body["choices"][0]["finish_reason"] == "stop"
    # at 2 tokens: 1 and 3 trail (ceil(0.5 x 4) = 2 go on); at 4 tokens: 2 trails 0
    candidates = body["candidates"]
    assert [c["finish_reason"] for c in candidates] == ["stop", PRUNED, PRUNED, PRUNED]
    assert [c["chosen"] for c in candidates] == [True, False, False, False]
    assert generator.aborted == 3
    assert [body["seed"] for body, _ in generator.calls] == [0, 1, 2, 3]
    for c in candidates[1:]:  # a partial answer, scored as it was when pruned
        assert TEXTS[c["index"]].startswith(c["text"])
        assert len(c["text"].split()) < len(TEXTS[c["index"]].split())
    assert candidates[1]["reward"] < 0
    assert candidates[0]["reward"] == 10.0  # its whole answer's reward
    assert TEXTS[0] in {answer for batch in scorer.batches for answer in batch}
    # everything generated is charged, the pruned candidates' tokens too
    assert body["usage"]["completion_tokens"] == sum(len(c["text"].split()) for c in candidates)

    (record,) = store.wait_for(lambda records: len(records) == 1)
    assert isinstance(record, CompletionRecord)
    assert [c.finish_reason for c in record.candidates] == ["stop", PRUNED, PRUNED, PRUNED]
    assert [c.index for c in record.whole] == [0]
    assert record.candidates[0].chosen


def test_pruning_never_goes_below_the_answers_asked_for(make_client: Callable[..., TestClient]) -> None:
    client, generator, _ = _pruning(make_client)
    response = client.post(CHAT, json={**BODY, "n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["message"]["content"] for c in body["choices"]] == [TEXTS[0], TEXTS[2]]
    assert [c["finish_reason"] for c in body["candidates"]] == ["stop", PRUNED, "stop", PRUNED]
    assert generator.aborted == 2


def test_a_request_chooses_its_selection(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(TEXTS)
    client = make_client(generator=generator, scorer=WordScorer(), prune={"every_tokens": 2})
    plain = client.post(CHAT, json=BODY)
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-bon-selection"] == "best_of_n"
    assert all(c["finish_reason"] == "stop" for c in plain.json()["candidates"])
    pruned = client.post(CHAT, json={**BODY, "selection": "prune"})
    assert pruned.status_code == 200, pruned.text
    assert pruned.headers["x-bon-selection"] == "prune"
    assert PRUNED in {c["finish_reason"] for c in pruned.json()["candidates"]}
    assert plain.json()["choices"][0]["message"] == pruned.json()["choices"][0]["message"]
    one = client.post(CHAT, json={**BODY, "n_candidates": 1, "selection": "prune"})
    assert one.status_code == 200, one.text
    assert "x-bon-selection" not in one.headers


def test_an_unknown_selection_is_a_400_naming_it(make_client: Callable[..., TestClient]) -> None:
    client, _, _ = _pruning(make_client)
    response = client.post(CHAT, json={**BODY, "selection": "beam"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "selection"


@pytest.mark.parametrize(("policy", "status"), [("fail_open", 200), ("fail_closed", 503)])
def test_a_failing_reward_model_falls_back_to_best_of_n_and_its_policy(
    make_client: Callable[..., TestClient], policy: str, status: int
) -> None:
    generator = FakeGenerator(TEXTS)
    client = make_client(generator=generator, scorer=WordScorer(fail=True), selection="prune",
                         scorer_settings={"on_failure": policy})  # fmt: skip
    response = client.post(CHAT, json=BODY)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.headers["x-bon-degraded"] == "scorer_failed"
        assert all(c["finish_reason"] == "stop" for c in response.json()["candidates"])


def test_a_backend_failure_aborts_the_other_samples(make_client: Callable[..., TestClient]) -> None:
    from gateway.errors import BackendFailed

    client, generator, _ = _pruning(make_client)
    generator.error = BackendFailed("the model backend failed: boom")
    response = client.post(CHAT, json=BODY)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "the model backend failed: boom"


def _streamed(client: TestClient, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    with client.stream("POST", CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["x-bon-selection"] == "prune"
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]


def test_streamed_the_leader_is_relayed_as_it_decodes_once_it_is_alone(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    client, generator, _ = _pruning(make_client)
    chunks = _streamed(client, BODY)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # alone after the checkpoint at 4 tokens: what it had then in the first chunk, then word by word
    assert "".join(content) == TEXTS[0]
    assert 2 <= len(content) < len(TEXTS[0].split())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    assert {c.model for c in chunks} == {"toy-bon"}
    usage = chunks[-1].usage
    assert usage is not None
    (record,) = store.wait_for(lambda records: len(records) == 1)
    assert isinstance(record, CompletionRecord)
    assert usage.completion_tokens == record.completion_tokens
    assert [c.finish_reason for c in record.candidates] == ["stop", PRUNED, PRUNED, PRUNED]
    assert generator.aborted == 3


def test_streamed_with_no_candidate_alone_the_answer_comes_after_selection(make_client: Callable[..., TestClient]) -> None:
    client, generator, _ = _pruning(make_client)
    generator.texts[0] = "good."  # finishes first: it stays a contender, so no candidate is ever alone and decoding
    chunks = _streamed(client, BODY)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content == ["good."]
    assert generator.aborted == 3


@pytest.mark.parametrize("straggler_ms", [None, 20])
def test_a_straggler_holds_a_checkpoint_back_only_up_to_straggler_ms(
    make_client: Callable[..., TestClient], straggler_ms: float | None
) -> None:
    """Candidate 3 decodes 25 times slower. Waiting for it at the first checkpoint, the others finish first (nothing
    saved on them); with ``prune.straggler_ms`` the checkpoint is decided among the three there (two go on: candidate
    1, the worst, is aborted). Either way the straggler is compared when it reaches 2 tokens, and loses."""
    generator = FakeGenerator(TEXTS)
    generator.word_gap_s, generator.gaps = 0.02, {3: 0.5}
    prune = {"every_tokens": 2, "keep": 0.5, "min_keep": 1, "straggler_ms": straggler_ms}
    client = make_client(generator=generator, scorer=WordScorer(), selection="prune", prune=prune)
    response = client.post(CHAT, json=BODY)
    assert response.status_code == 200, response.text
    reasons = [c["finish_reason"] for c in response.json()["candidates"]]
    assert reasons[0] == "stop"
    if straggler_ms is None:  # the first checkpoint waited for candidate 3: 0, 1 and 2 ran to their end meanwhile
        assert reasons[1:3] == ["stop", "stop"]
    else:
        assert reasons[1] == PRUNED
    assert reasons[3] == PRUNED  # at its own first checkpoint, against whole answers
