"""Multi-objective scoring (``gateway.objectives``): the judge's verdict from log-probabilities, the refusal detector,
and on fakes: weights change the choice, each score is returned and logged, bad weights are a 400; the judge over real
HTTP (a stand-in OpenAI-compatible server)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.objectives import Refusals, verdict
from gateway.store.records import CompletionRecord
from tests.gateway.fakes import FakeGenerator, FakeScorer, FakeStore
from tests.serving import serving

CHAT = "/v1/chat/completions"
TEXTS = ["Sure! 3 plus 4 is 7, glad to help you with that today.", "7.", "I can't help with that.", "It is 9."]
REWARDS = {TEXTS[0]: 2.5, TEXTS[1]: 1.2, TEXTS[2]: 1.9, TEXTS[3]: -1.0}
BODY: dict[str, Any] = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}],
                        "n_candidates": 4, "return_candidates": True}  # fmt: skip


def _completion(token: str, top: dict[str, float] | None = None) -> dict[str, Any]:
    listed = [{"token": t, "logprob": lp} for t, lp in (top or {}).items()]
    return {"choices": [{"message": {"content": token}, "logprobs": {"content": [{"token": token, "top_logprobs": listed}]}}]}


def test_the_verdict_is_p_yes_over_yes_and_no() -> None:
    assert verdict(_completion(" Yes", {" Yes": math.log(0.6), "no": math.log(0.2), "maybe": math.log(0.2)})) == pytest.approx(
        0.75
    )
    assert verdict(_completion("no", {"no": 0.0})) == 0.0
    assert verdict(_completion("yes")) == 1.0  # no alternatives listed: the token itself
    assert verdict(_completion("No.")) == 0.0
    assert verdict(_completion("perhaps")) == 0.5
    assert verdict({"choices": []}) == 0.5


def test_refusals_by_the_built_in_list_or_configured_patterns() -> None:
    default = Refusals()
    assert default("I can't help with that.") == 1.0
    assert default("As an AI, I will not.") == 1.0
    assert default("Sure, 7.") == 0.0
    custom = Refusals([r"\bdecline\b"])
    assert (custom("I decline."), custom("I can't.")) == (1.0, 0.0)


def _client(make_client: Callable[..., TestClient], **overrides: Any) -> TestClient:
    return make_client(generator=FakeGenerator(TEXTS), scorer=FakeScorer(REWARDS), **overrides)


def _chosen(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def test_weights_change_the_choice_and_every_score_is_returned_and_logged(
    make_client: Callable[..., TestClient], store: FakeStore
) -> None:
    client = _client(make_client)
    plain = client.post(CHAT, json=BODY).json()
    assert _chosen(plain) == TEXTS[0]  # the reward model's favourite: long and polite
    assert "scores" not in plain["candidates"][0]  # the reward model alone: its reward is the score
    concise = client.post(CHAT, json={**BODY, "reward_weights": {"reward_model": 1.0, "length": -0.1}})
    assert concise.status_code == 200, concise.text
    body = concise.json()
    assert _chosen(body) == TEXTS[2]  # 1.9 - 0.5 beats 2.5 - 1.2 and 1.2 - 0.1 ...
    no_refusals = client.post(CHAT, json={**BODY, "reward_weights": {"reward_model": 1.0, "length": -0.1, "refusal": -2.0}})
    assert _chosen(no_refusals.json()) == TEXTS[0]  # ... unless refusing costs 2
    for c in body["candidates"]:
        assert c["scores"] == {"reward_model": REWARDS[c["text"]], "length": len(c["text"].split())}
        assert c["reward"] == pytest.approx(REWARDS[c["text"]] - 0.1 * len(c["text"].split()))
    records = store.wait_for(lambda records: len(records) == 3)
    logged = [r for r in records if isinstance(r, CompletionRecord)]
    assert [r.rm_version for r in logged] == ["rm-fake", "rm-fake~custom", "rm-fake~custom"]  # a private objective
    assert logged[0].candidates[0].scores is None
    assert logged[2].candidates[2].scores == {"reward_model": 1.9, "length": 5.0, "refusal": 1.0}
    # configured weights are the deployment's objective: logged under the reward model's version, with the scores
    configured = _client(make_client, objectives={"weights": {"reward_model": 1.0, "refusal": -2.0}})
    assert _chosen(configured.post(CHAT, json=BODY).json()) == TEXTS[0]
    assert (
        _chosen(configured.post(CHAT, json={**BODY, "reward_weights": {"reward_model": 1.0, "refusal": -2.0}}).json()) == TEXTS[0]
    )
    records = store.wait_for(lambda records: len(records) == 5)
    assert [r.rm_version for r in records[3:] if isinstance(r, CompletionRecord)] == ["rm-fake", "rm-fake"]
    assert records[3].candidates[2].scores == {"reward_model": 1.9, "refusal": 1.0}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"politeness": 1.0}, "unknown objective 'politeness'"), ({"judge": 1.0}, "needs a judge"),
     ({"reward_model": 0.0}, "weight 0"), ({"length": "long"}, "")],
)  # fmt: skip
def test_bad_weights_are_a_400_naming_the_field(
    make_client: Callable[..., TestClient], weights: dict[str, Any], message: str
) -> None:
    client = _client(make_client, adaptive={"enabled": True})
    response = client.post(CHAT, json={**{k: v for k, v in BODY.items() if k != "n_candidates"}, "reward_weights": weights})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"].startswith("reward_weights")
    assert message in error["message"]
    assert "bon_adaptive_n_total{" not in client.get("/metrics").text  # refused before adaptive N counted it


def _judge_app(calls: list[dict[str, Any]]) -> FastAPI:
    """An OpenAI-compatible stand-in judge: yes, with probability 0.9, to an answer that says 7; else 0.2."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def judge(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        p = 0.9 if " 7" in body["messages"][0]["content"].split("Answer:")[1] else 0.2
        return _completion("yes" if p > 0.5 else "no", {"yes": math.log(p), "no": math.log(1 - p)})

    return app


def test_an_llm_judge_over_http_scores_each_candidate(make_client: Callable[..., TestClient]) -> None:
    calls: list[dict[str, Any]] = []
    with serving(_judge_app(calls)) as judge_url:
        client = _client(make_client, objectives={"judge": {"url": judge_url, "model": "judge-model"}})
        response = client.post(CHAT, json={**BODY, "reward_weights": {"judge": 1.0, "length": -0.01}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert _chosen(body) == TEXTS[1]  # "7." and the long answer both say 7 (0.9); the shorter wins
        assert [c["scores"]["judge"] for c in body["candidates"]] == pytest.approx([0.9, 0.9, 0.2, 0.2])
        assert len(calls) == 4
        assert {c["model"] for c in calls} == {"judge-model"}
        assert all(c["max_tokens"] == 1 and c["logprobs"] for c in calls)
        assert "What is 3 plus 4?" in calls[0]["messages"][0]["content"]
    down = _client(make_client, objectives={"judge": {"url": "http://127.0.0.1:9", "timeout_s": 2}})
    failed = down.post(CHAT, json={**BODY, "reward_weights": {"judge": 1.0}})
    assert failed.status_code == 503  # scorer.on_failure fail_closed: the judge is part of the reward
    assert "judge" in failed.json()["error"]["message"]
