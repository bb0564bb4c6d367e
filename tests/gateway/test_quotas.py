"""Per-key quotas and scopes: rates as token buckets on a clock the test moves, the tokens a request did not use
given back, requests at once, per-request limits, the share of each replica, and OpenAI's headers on the wire."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.auth import digest
from gateway.errors import InvalidRequest, RateLimited
from gateway.quotas import Quotas
from gateway.settings import ApiKey
from tests.gateway.test_errors import CHAT, MESSAGES, assert_error


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(**quotas: Any) -> ApiKey:
    return ApiKey(id="team", sha256=digest("sk-team"), **quotas)


def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    quotas = Quotas([key(requests_per_minute=2)], clock=clock)
    for _ in range(2):
        quotas.settle(quotas.admit("team", 1, 10), 10)
    with pytest.raises(RateLimited) as refused:
        quotas.admit("team", 1, 10)
    assert refused.value.headers["retry-after"] == "30"  # one request per 30 s
    assert refused.value.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 30
    quotas.admit("team", 1, 10)


def test_tokens_are_reserved_then_what_was_not_generated_goes_back() -> None:
    clock = Clock()
    quotas = Quotas([key(tokens_per_minute=1000)], clock=clock)
    ticket = quotas.admit("team", 4, 200)  # 800 reserved
    assert quotas.headers("team")["x-ratelimit-remaining-tokens"] == "200"
    with pytest.raises(RateLimited):
        quotas.admit("team", 4, 100)
    quotas.settle(ticket, 300)  # 500 back
    assert quotas.headers("team")["x-ratelimit-remaining-tokens"] == "700"
    quotas.admit("team", 4, 100)
    with pytest.raises(InvalidRequest, match="exceeds this API key's 1000 tokens per minute"):
        quotas.admit("team", 8, 200)  # could never be admitted: a 400, not a 429 to retry forever


def test_requests_at_once_and_per_request_limits() -> None:
    quotas = Quotas([key(max_concurrent=1, max_n_candidates=4, max_tokens=64)], clock=Clock())
    first = quotas.admit("team", 4, 64)
    with pytest.raises(RateLimited, match="already has 1 requests running"):
        quotas.admit("team", 1, 8)
    quotas.settle(first, None)
    quotas.settle(quotas.admit("team", 1, 8), 8)
    with pytest.raises(InvalidRequest) as too_many:
        quotas.admit("team", 8, 8)
    assert too_many.value.param == "n_candidates"
    with pytest.raises(InvalidRequest) as too_long:
        quotas.admit("team", 1, 65)
    assert too_long.value.param == "max_tokens"
    quotas.admit("other-key-without-quotas", 16, 1000)  # unknown to the quotas: nothing to hold


def test_each_of_several_replicas_enforces_its_share() -> None:
    clock = Clock()
    quotas = Quotas([key(requests_per_minute=10, max_concurrent=3)], replicas=2, clock=clock)
    tickets = [quotas.admit("team", 1, 1) for _ in range(1)]
    with pytest.raises(RateLimited, match="1 requests running"):  # floor(3 / 2)
        quotas.admit("team", 1, 1)
    for ticket in tickets:
        quotas.settle(ticket, 1)
    for _ in range(4):
        quotas.settle(quotas.admit("team", 1, 1), 1)  # 5 of this replica's 5 per minute
    with pytest.raises(RateLimited):
        quotas.admit("team", 1, 1)
    assert quotas.headers("team")["x-ratelimit-limit-requests"] == "5"


KEYS = [
    {"id": "limited", "sha256": digest("sk-limited"), "requests_per_minute": 2},
    {"id": "feedback-only", "sha256": digest("sk-feedback"), "scopes": ["feedback"]},
    {"id": "ops", "sha256": digest("sk-ops"), "scopes": ["admin"]},
]


def test_quotas_and_scopes_over_http(make_client: Callable[..., TestClient], tmp_path: Any) -> None:
    client = make_client(api_keys=KEYS, admin_token="admin-token", swap={"registry_dir": str(tmp_path / "registry")})
    body = {"model": "toy-bon", "messages": MESSAGES}
    limited = {"authorization": "Bearer sk-limited"}
    ok = client.post(CHAT, json=body, headers=limited)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert client.post(CHAT, json=body, headers=limited).status_code == 200
    refused = client.post(CHAT, json=body, headers=limited)
    assert_error(refused, 429, code="rate_limit_exceeded")
    assert {"retry-after", "x-ratelimit-reset-requests", "x-request-id"} <= set(refused.headers)

    assert_error(client.post(CHAT, json=body, headers={"authorization": "Bearer sk-feedback"}), 403, code="permission_denied")
    feedback = {"completion_id": ok.json()["id"], "thumb": "up"}
    assert_error(client.post("/v1/feedback", json=feedback, headers={"authorization": "Bearer sk-ops"}), 403)
    assert client.get("/admin/policy", headers={"authorization": "Bearer sk-ops"}).status_code == 200  # an admin key
    assert_error(client.get("/admin/policy", headers=limited), 403)


def test_a_replica_share_under_one_request_a_minute_still_admits_one_now_and_then() -> None:
    clock = Clock()
    quotas = Quotas([key(requests_per_minute=2)], replicas=4, clock=clock)  # half a request a minute here
    quotas.settle(quotas.admit("team", 1, 1), 1)
    with pytest.raises(RateLimited):
        quotas.admit("team", 1, 1)
    clock.now += 120
    quotas.admit("team", 1, 1)
