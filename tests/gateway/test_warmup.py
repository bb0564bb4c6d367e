"""``/ready`` waits for one warm-up request (best-of-N through the served route, and its rewards), never logged."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from gateway.errors import BackendUnavailable
from tests.gateway.conftest import ANSWERS
from tests.gateway.fakes import FakeGenerator, FakeStore
from tests.polling import wait_until


def test_ready_after_one_warm_up_request_that_is_not_logged(make_client: Callable[..., TestClient], store: FakeStore) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator, warmup=True)
    wait_until(lambda: client.get("/ready").status_code == 200, 10, "never ready")
    assert [(n, body["max_tokens"]) for body, n in generator.calls] == [(4, 4)]  # the configured N, a few tokens
    assert client.get("/ready").json()["checks"]["warm"] is True
    assert store.snapshot() == []


def test_not_ready_until_the_warm_up_goes_through(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(ANSWERS, error=BackendUnavailable("vLLM is still starting"))
    client = make_client(generator=generator, warmup=True)
    wait_until(lambda: len(generator.calls) >= 1, 10, "no warm-up was tried")
    response = client.get("/ready")
    assert response.status_code == 503
    assert "warm" in response.json()["error"]["message"]
    generator.error = None  # vLLM is up: the next try (2 s later) goes through
    wait_until(lambda: client.get("/ready").status_code == 200, 20, "never ready after vLLM came up")
