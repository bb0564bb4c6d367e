"""The gateway's log on fakes: every candidate recorded off the critical path, `store: false`,
N=1 answers scored after the response, streamed answers collected on the way."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from fastapi.testclient import TestClient

from gateway.store.records import CompletionRecord
from tests.gateway.conftest import ANSWERS, REWARDS
from tests.gateway.fakes import FakeScorer, FakeStore

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


def completions(records: Sequence[object]) -> list[CompletionRecord]:
    return [r for r in records if isinstance(r, CompletionRecord)]


def test_every_candidate_is_recorded_with_its_reward(client: TestClient, store: FakeStore) -> None:
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "temperature": 0.7, "seed": 3})
    body = response.json()
    [record] = completions(store.wait_for(lambda rs: len(completions(rs)) == 1))
    assert record.id == body["id"]
    assert record.key_id == "anonymous"
    assert record.messages == MESSAGES
    assert record.params["temperature"] == 0.7
    assert record.params["seed"] == 3
    assert (record.policy_version, record.rm_version, record.n_candidates) == ("base", "rm-fake", 4)
    assert [c.text for c in record.candidates] == ANSWERS
    assert [c.reward for c in record.candidates] == [REWARDS[a] for a in ANSWERS]
    assert [c.chosen for c in record.candidates] == [a == body["choices"][0]["message"]["content"] for a in ANSWERS]
    assert [c.token_count for c in record.candidates] == [2, 3, 4, 5]
    assert record.completion_tokens == body["usage"]["completion_tokens"]
    assert {"generate", "score", "select"} <= set(record.timings_ms)


def test_store_false_is_served_but_not_kept(client: TestClient, store: FakeStore) -> None:
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "store": False})
    assert response.status_code == 200
    client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})  # a marker that the writer has caught up
    [kept] = completions(store.wait_for(lambda rs: len(completions(rs)) >= 1))
    assert kept.id != response.json()["id"]
    assert 'bon_requests_total{status="200"} 2.0' in client.get("/metrics").text


def test_one_candidate_is_scored_for_the_log_after_the_response(client: TestClient, store: FakeStore) -> None:
    body = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n_candidates": 1}).json()
    assert "candidates" not in body
    [record] = completions(store.wait_for(lambda rs: len(completions(rs)) == 1))
    assert record.candidates[0].reward == REWARDS[ANSWERS[0]]
    assert record.rm_version == "rm-fake"
    assert record.candidates[0].chosen


def test_an_answer_the_reward_model_cannot_score_in_time_is_logged_unscored(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    client = make_client(scorer=FakeScorer(REWARDS, delay_s=60), scorer_settings={"deadline_ms": 100})
    body = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n_candidates": 1}).json()
    [record] = completions(store.wait_for(lambda rs: len(completions(rs)) == 1))  # not after the scorer's 60 s
    assert record.id == body["id"]
    assert (record.candidates[0].reward, record.rm_version) == (None, None)


def test_streamed_answer_is_logged_and_token_ids_are_not_shown_to_the_client(client: TestClient, store: FakeStore) -> None:
    with client.stream("POST", CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n_candidates": 1, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert all("token_ids" not in c["choices"][0] for c in chunks if c["choices"])
    assert all("prompt_token_ids" not in c and c.get("usage") is None for c in chunks)  # usage was not asked for
    assert all(c["choices"] for c in chunks)  # nor its usage-only chunk
    [record] = completions(store.wait_for(lambda rs: len(completions(rs)) == 1))
    assert record.id == chunks[0]["id"]
    assert record.candidates[0].text == ANSWERS[0]
    assert record.candidates[0].token_ids == list(range(len(chunks) - 1))
    assert record.completion_tokens == 3  # from the usage the gateway asked vLLM for


def test_database_down_spools_and_replays_without_loss(make_client: Callable[..., TestClient], store: FakeStore) -> None:
    client = make_client(store={"retry_s": 0.05})
    store.down = True
    ids = [client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).json()["id"] for _ in range(5)]
    metrics = client.get("/metrics").text
    assert "bon_log_records_spooled_total" in metrics
    store.down = False
    records = store.wait_for(lambda rs: len(completions(rs)) >= 5)
    assert sorted(r.id for r in completions(records)) == sorted(ids)
