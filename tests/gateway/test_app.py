"""The HTTP surface on fakes: best-of-N selection, extensions, streaming, and the SDK's view."""

from __future__ import annotations

import json
from collections.abc import Callable

import openai
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.gateway.conftest import ANSWERS, REWARDS
from tests.gateway.fakes import FakeGenerator, FakeScorer

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 3 plus 4?"}]


def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key="none", base_url="http://testserver/v1", http_client=client, max_retries=0)


def test_best_of_n_returns_the_highest_reward_candidate(client: TestClient) -> None:
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
    assert response.status_code == 200
    body = ChatCompletion.model_validate(response.json())
    assert body.choices[0].message.content == max(ANSWERS, key=REWARDS.__getitem__)
    assert body.model == "toy-bon"
    assert body.system_fingerprint == "base"
    assert response.headers["x-policy-version"] == "base"
    assert body.id.startswith("chatcmpl-")
    assert body.usage is not None
    assert body.usage.completion_tokens == 2 + 3 + 4 + 5  # every candidate's tokens, not just the chosen one's


def test_n_returns_ranked_choices_and_raises_n_candidates(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator, n_candidates=2)
    body = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n": 3}).json()
    assert generator.calls[-1][1] == 3  # n above n_candidates raises it
    ranked = sorted(ANSWERS[:3], key=REWARDS.__getitem__, reverse=True)
    assert [c["message"]["content"] for c in body["choices"]] == ranked
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]


def test_return_candidates_lists_every_candidate_with_its_reward(client: TestClient) -> None:
    body = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "return_candidates": True}).json()
    candidates = body["candidates"]
    assert [c["text"] for c in candidates] == ANSWERS
    assert [c["reward"] for c in candidates] == [REWARDS[a] for a in ANSWERS]
    assert [c["chosen"] for c in candidates] == [False, True, False, False]


def test_sampling_fields_pass_through_and_gateway_fields_do_not(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator)
    request = {
        "model": "toy-bon", "messages": MESSAGES, "temperature": 0.3, "top_p": 0.9, "seed": 4, "stop": ["\n"],
        "user": "u1", "max_completion_tokens": 20, "top_k": 5, "n_candidates": 2, "metadata": {"a": "b"}, "store": False,
    }  # fmt: skip
    assert client.post(CHAT, json=request).status_code == 200
    body, n = generator.calls[-1]
    assert n == 2
    assert {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "user", "top_k")} == {
        "temperature": 0.3, "top_p": 0.9, "seed": 4, "stop": ["\n"], "user": "u1", "top_k": 5,
    }  # fmt: skip
    assert body["max_tokens"] == 20
    assert not {"n_candidates", "metadata", "store", "max_completion_tokens", "model", "n", "stream"} & body.keys()


def test_logprobs_only_when_asked(client: TestClient) -> None:
    plain = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).json()
    asked = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "logprobs": True}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert asked["choices"][0]["logprobs"] == {"content": []}


def test_sdk_non_streaming_and_raw_headers(client: TestClient) -> None:
    raw = sdk(client).chat.completions.with_raw_response.create(model="toy-bon", messages=MESSAGES, n=2)
    assert raw.headers["x-policy-version"] == "base"
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    assert [c.message.content for c in completion.choices] == ["Sure! 3 plus 4 is 7.", "7."]


def test_sdk_streaming_best_of_n_with_usage(client: TestClient) -> None:
    stream = sdk(client).chat.completions.create(
        model="toy-bon",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Sure! 3 plus 4 is 7."
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 14
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1


def test_streaming_n1_relays_with_gateway_ids(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(["Sure! 3 plus 4 is 7."])
    client = make_client(generator=generator, n_candidates=1)
    with client.stream(
        "POST", CHAT, json={"model": "toy-bon", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.status_code == 200
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert len(chunks) > 4  # token by token, not one piece
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Sure! 3 plus 4 is 7."
    assert {c.model for c in chunks} == {"toy-bon"}
    assert {c.system_fingerprint for c in chunks} == {"base"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].id != "chatcmpl-vllm"
    assert chunks[-1].usage is not None
    assert generator.calls[-1][0]["stream_options"] == {"include_usage": True}


def test_models_health_ready_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["toy-bon"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
    text = client.get("/metrics").text
    assert 'bon_stage_latency_seconds_count{stage="score"} 1.0' in text
    assert 'bon_chosen_reward_stats_sum{policy_version="base"} 2.5' in text
    assert 'bon_requests_total{status="200"} 1.0' in text
    assert "bon_candidates_per_request_count 1.0" in text


def test_ready_fails_when_the_scorer_is_down(make_client: Callable[..., TestClient]) -> None:
    client = make_client(scorer=FakeScorer(REWARDS, fail=True))
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
