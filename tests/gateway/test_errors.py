"""Every bad input and failure gets OpenAI error JSON with the right status, never a traceback."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from fastapi.testclient import TestClient

from gateway.auth import digest
from gateway.errors import BackendTimeout, BackendUnavailable
from tests.gateway.conftest import ANSWERS
from tests.gateway.fakes import FakeGenerator, FakeScorer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


def assert_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "toy-bon", "messages": []}, 400, "messages"),
        ({"model": "toy-bon"}, 400, "messages"),
        ({"model": "toy-bon", "messages": "hi"}, 400, "messages"),
        ({"model": "toy-bon", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "toy-bon", "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "toy-bon", "messages": MESSAGES, "n_candidates": 17}, 400, "n_candidates"),
        ({"model": "toy-bon", "messages": MESSAGES, "n": 17}, 400, "n"),
        ({"model": "toy-bon", "messages": MESSAGES, "n_candidates": 0}, 400, "n_candidates"),
        ({"model": "toy-bon", "messages": MESSAGES, "max_tokens": 193}, 400, "max_tokens"),
        ({"model": "toy-bon", "messages": MESSAGES, "max_completion_tokens": 500}, 400, "max_completion_tokens"),
        ({"model": "toy-bon", "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
        ({"model": "toy-bon", "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"model": "toy-bon", "messages": MESSAGES, "modalities": ["text", "audio"]}, 400, "modalities"),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model"),
    ],
)
def test_bad_requests(client: TestClient, body: dict[str, Any], status: int, param: str) -> None:
    assert_error(client.post(CHAT, json=body), status, param)


def test_tools_are_fine_with_one_candidate(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "tools": tools, "n_candidates": 1})
    assert response.status_code == 200
    assert generator.calls[-1][0]["tools"] == tools


def test_standard_fields_from_sdks_and_chat_uis_are_accepted(client: TestClient) -> None:
    body = {
        "model": "toy-bon", "messages": [{"role": "system", "content": "Be brief."}, *MESSAGES],
        "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "stream": False, "user": "x",
        "tool_choice": "none", "parallel_tool_calls": False, "response_format": {"type": "text"},
        "metadata": {"k": "v"}, "store": True, "service_tier": "auto", "reasoning_effort": "low", "verbosity": "low",
        "prompt_cache_key": "k", "safety_identifier": "s", "function_call": "none",
    }  # fmt: skip
    assert client.post(CHAT, json=body).status_code == 200


def test_malformed_json_and_wrong_content_type(client: TestClient) -> None:
    assert_error(client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, content=b"model=toy-bon", headers={"content-type": "text/plain"}), 415)


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get(CHAT), 405)


def test_keys_when_configured(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=[{"id": "team-a", "sha256": digest("sk-good")}])
    assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 401, code="invalid_api_key")
    wrong = {"authorization": "Bearer sk-bad"}
    assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}, headers=wrong), 401)
    assert_error(client.get("/v1/models", headers={"authorization": "Basic abc"}), 401)
    good = {"authorization": "Bearer sk-good"}
    assert client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}, headers=good).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_backend_errors_map_to_statuses(make_client: Callable[..., TestClient]) -> None:
    down = make_client(generator=FakeGenerator(ANSWERS, error=BackendUnavailable("no model backend is reachable")))
    assert_error(down.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 503, code="backend_unavailable")
    slow = make_client(generator=FakeGenerator(ANSWERS, error=BackendTimeout("too slow")))
    response = slow.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "stream": True, "n_candidates": 1})
    assert_error(response, 504, code="backend_timeout")  # a stream that fails before its first byte keeps its status
    assert response.headers["x-request-id"]


def test_scorer_failure_is_a_clear_500(make_client: Callable[..., TestClient]) -> None:
    client = make_client(scorer=FakeScorer({}, fail=True))
    error = assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 500, code="reward_model_error")
    assert "reward model" in error["message"]


# ---- the real vLLM client against a dead and a hanging backend ----


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def hanging_backend() -> Iterator[str]:
    """An HTTP server that accepts chat requests and never answers them."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = _closed_port()
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await release.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(release.set)
    thread.join(10)
    loop.close()


def _real_client(backends: list[dict[str, str]], **overrides: Any) -> TestClient:
    from gateway.app import create_app
    from tests.gateway.conftest import settings

    overrides.setdefault("store", {"enabled": False})  # these tests are about the backend, not the log
    return TestClient(create_app(settings(backends=backends, **overrides), scorer=FakeScorer({})), raise_server_exceptions=False)


def test_dead_backend_is_503() -> None:
    with _real_client([{"url": f"http://127.0.0.1:{_closed_port()}", "model": "policy"}]) as client:
        assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 503, code="backend_unavailable")
        assert_error(client.get("/ready"), 503, code="not_ready")


def test_hanging_backend_is_504(hanging_backend: str) -> None:
    with _real_client([{"url": hanging_backend, "model": "policy"}], timeouts={"request_s": 0.5}) as client:
        assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 504, code="backend_timeout")
        stream = {"model": "toy-bon", "messages": MESSAGES, "stream": True, "n_candidates": 1}
        assert_error(client.post(CHAT, json=stream), 504, code="backend_timeout")


def test_failover_to_the_next_backend_when_one_is_unreachable(hanging_backend: str) -> None:
    backends = [{"url": f"http://127.0.0.1:{_closed_port()}", "model": "policy"}, {"url": hanging_backend, "model": "policy"}]
    with _real_client(backends, timeouts={"request_s": 0.5}) as client:
        # the dead one is skipped; the hanging one is reached, hence a timeout rather than 503
        assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 504)
