"""Every bad input and failure gets OpenAI error JSON with the right status, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fastapi.testclient import TestClient

from gateway.auth import digest
from gateway.errors import BackendTimeout, BackendUnavailable
from tests.gateway.backends import chat_backend
from tests.gateway.conftest import ANSWERS, LOCAL
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


@pytest.mark.parametrize(
    "field", ["priority", "ignore_eos", "min_tokens", "request_id", "cache_salt", "kv_transfer_params", "chat_template", "typo"]
)
def test_fields_that_schedule_or_budget_vllm_are_refused_by_name(make_client: Callable[..., TestClient], field: str) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator)
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, field: 1})
    assert_error(response, 400, param=field, code="unknown_field")
    assert generator.calls == []


def test_a_deployment_may_allow_more_vllm_fields(make_client: Callable[..., TestClient]) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator, vllm_fields=["ignore_eos", "top_k"])
    body = {"model": "toy-bon", "messages": MESSAGES, "ignore_eos": True, "top_k": 3}
    assert client.post(CHAT, json=body).status_code == 200
    assert {k: generator.calls[-1][0][k] for k in ("ignore_eos", "top_k")} == {"ignore_eos": True, "top_k": 3}
    assert_error(client.post(CHAT, json={**body, "min_p": 0.1}), 400, param="min_p")  # the default list is replaced


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


def test_a_failing_reward_model_fails_closed_by_default(make_client: Callable[..., TestClient]) -> None:
    client = make_client(scorer=FakeScorer({}, fail=True))
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
    error = assert_error(response, 503, code="reward_model_unavailable")
    assert "reward model failed" in error["message"]
    late = make_client(scorer=FakeScorer({}, delay_s=5), scorer_settings={"deadline_ms": 50})
    error = assert_error(late.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 503, code="reward_model_unavailable")
    assert "deadline" in error["message"]


@pytest.mark.parametrize(
    ("scorer", "reason"), [(FakeScorer({}, fail=True), "scorer_failed"), (FakeScorer({}, delay_s=5), "scorer_timeout")]
)
def test_fail_open_answers_unranked_and_says_so(make_client: Callable[..., TestClient], scorer: FakeScorer, reason: str) -> None:
    client = make_client(scorer=scorer, scorer_settings={"on_failure": "fail_open", "deadline_ms": 50})
    body = {"model": "toy-bon", "messages": MESSAGES, "n_candidates": 4, "return_candidates": True}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    assert response.headers["x-bon-degraded"] == reason
    data = response.json()
    assert data["degraded"] == reason
    assert data["choices"][0]["message"]["content"] == ANSWERS[0]  # the first candidate, not ranked
    assert all(c["reward"] is None for c in data["candidates"])
    assert f'bon_degraded_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text
    streamed = client.post(CHAT, json={**body, "stream": True})
    assert streamed.headers["x-bon-degraded"] == reason


# ---- the real vLLM client against a dead and a hanging backend ----


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def hanging_backend() -> Iterator[str]:
    """An HTTP server that accepts chat requests and never answers them."""

    async def hang(request: web.Request, stopping: asyncio.Event) -> web.Response:
        await stopping.wait()
        return web.json_response({})

    with chat_backend(hang) as url:
        yield url


def _real_client(backends: list[dict[str, str]], **overrides: Any) -> TestClient:
    from gateway.app import create_app
    from tests.gateway.conftest import settings

    overrides.setdefault("store", {"enabled": False})  # these tests are about the backend, not the log
    return TestClient(
        create_app(settings(backends=backends, **overrides), scorer=FakeScorer({})), raise_server_exceptions=False, client=LOCAL
    )


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


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A backend whose host drops connection attempts: a listening socket whose accept queue is full, so the kernel
    answers no further SYN (what a dead host or a dropping firewall looks like: no refusal, just silence)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # never accepted: it only fills the queue
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for s in [*fillers, server]:
        s.close()


TOOL_CALL = {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}


@pytest.fixture
def answering_backend() -> Iterator[str]:
    """An HTTP server answering every chat request with one fixed completion; a request with ``tools`` gets what vLLM
    answers when the model calls one (``content`` null, ``tool_calls``)."""

    async def answer(request: web.Request, stopping: asyncio.Event) -> web.Response:
        body = await request.json()
        message: dict[str, Any] = {"role": "assistant", "content": "7.", "reasoning_content": None, "tool_calls": []}
        if body.get("tools"):
            message = {**message, "content": None, "tool_calls": [TOOL_CALL]}
        finish = "tool_calls" if body.get("tools") else "stop"
        choices = [{"index": i, "message": message, "finish_reason": finish, "token_ids": [5]} for i in range(body.get("n", 1))]
        usage = {"prompt_tokens": 5, "completion_tokens": len(choices), "total_tokens": 5 + len(choices)}
        return web.json_response({"id": "x", "object": "chat.completion", "choices": choices, "usage": usage})

    with chat_backend(answer) as url:
        yield url


def test_a_backend_that_drops_connections_is_failed_over_within_the_connect_timeout(
    blackhole: str, answering_backend: str
) -> None:
    """Without the connect timeout the first request would wait for the whole request timeout (30 s) and get 504."""
    backends = [{"url": blackhole, "model": "policy"}, {"url": answering_backend, "model": "policy"}]
    overrides = {"timeouts": {"connect_s": 0.3, "request_s": 30}, "breaker": {"failures": 1, "cooldown_s": 600}}
    with _real_client(backends, **overrides) as client:
        first = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n_candidates": 2})
        assert first.status_code == 200, first.text
        metrics = client.get("/metrics").text
        assert f'bon_backend_circuit_open{{backend="{blackhole}"}} 1.0' in metrics  # skipped from now on
        assert client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).status_code == 200


def test_when_every_backend_is_failing_requests_fail_fast_with_retry_after(hanging_backend: str) -> None:
    """A backend that timed out (frozen vLLM): its circuit opens and the next request gets 503 at once, not a wait."""
    overrides = {"timeouts": {"request_s": 0.5}, "breaker": {"failures": 1, "cooldown_s": 600}}
    with _real_client([{"url": hanging_backend, "model": "policy"}], **overrides) as client:
        assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 504, code="backend_timeout")
        response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
        assert_error(response, 503, code="backend_unavailable")
        assert "circuit open" in response.json()["error"]["message"]
        assert 500 <= int(response.headers["retry-after"]) <= 601


def test_a_tool_call_is_returned_as_vllm_answered_it(answering_backend: str) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with _real_client([{"url": answering_backend, "model": "policy"}]) as client:
        response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "tools": tools, "n_candidates": 1})
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
        assert choice["finish_reason"] == "tool_calls"
        plain = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "n_candidates": 2}).json()
        assert plain["choices"][0]["message"] == {"role": "assistant", "content": "7."}  # vLLM's empty fields left out


def test_a_keyless_gateway_serves_only_callers_on_its_host(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    body = {"model": "toy-bon", "messages": MESSAGES}
    assert client.post(CHAT, json=body).status_code == 200
    assert_error(client.post(CHAT, json=body, headers={"x-forwarded-for": "203.0.113.7"}), 401, code="invalid_api_key")
    remote = TestClient(client.app, client=("203.0.113.7", 40000), raise_server_exceptions=False)
    error = assert_error(remote.post(CHAT, json=body), 401, code="invalid_api_key")
    assert "allow_keyless_public" in error["message"]
    assert_error(remote.post("/v1/feedback", json={"completion_id": "x", "thumb": "up"}), 401)
    public = make_client(allow_keyless_public=True)
    assert public.post(CHAT, json=body, headers={"x-forwarded-for": "203.0.113.7"}).status_code == 200


@pytest.fixture
def overloaded_backend() -> Iterator[str]:
    """An HTTP server that refuses every chat request as vLLM does when its queue is full (503)."""

    async def refuse(request: web.Request, stopping: asyncio.Event) -> web.Response:
        error = {"message": "The request queue is full. Please retry later.", "type": "ServiceUnavailable", "code": 503}
        return web.json_response({"error": error}, status=503, headers={"retry-after": "3"})

    with chat_backend(refuse) as url:
        yield url


def test_vllm_with_a_full_queue_is_passed_on_as_overloaded_after_the_other_backends(
    overloaded_backend: str, answering_backend: str
) -> None:
    full = [{"url": overloaded_backend, "model": "policy"}]
    with _real_client(full, breaker={"failures": 1}) as client:
        for _ in range(2):  # an overloaded backend is alive: its circuit stays closed
            response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
            error = assert_error(response, 503, code="overloaded")
            assert "queue is full" in error["message"]
            assert response.headers["retry-after"] == "3"  # vLLM's
    with _real_client([*full, {"url": answering_backend, "model": "policy"}]) as client:
        assert client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).status_code == 200


def test_the_managed_vllm_bounds_its_queue() -> None:
    from gateway.settings import ManagedVLLM

    assert ManagedVLLM().vllm_args()[:2] == ["--max-num-queued-reqs", "256"]
    assert ManagedVLLM(max_num_queued_reqs=None, extra_args=["--seed", "1"]).vllm_args() == ["--seed", "1"]


def test_a_routed_version_the_backend_lost_is_reported_and_the_request_is_retryable() -> None:
    from gateway.generate import VLLMGenerator
    from gateway.settings import Backend

    async def missing(request: web.Request, stopping: asyncio.Event) -> web.Response:
        name = (await request.json())["model"]
        return web.json_response({"error": {"message": f"The model `{name}` does not exist.", "code": 404}}, status=404)

    async def ask(url: str) -> tuple[Exception, list[tuple[str, str]]]:
        lost: list[tuple[str, str]] = []
        async with aiohttp.ClientSession() as session:
            generator = VLLMGenerator(session, [Backend(url=url, model="policy")], 10.0)

            def missing_version(backend: str, model: str) -> bool:
                lost.append((backend, model))
                return True  # a routed version: the swapper reloads it

            generator.on_missing = missing_version
            try:
                await generator.generate({"messages": MESSAGES}, 2, {url: "policy@v0007"})
            except Exception as exc:
                return exc, lost
        raise AssertionError("expected an error")

    with chat_backend(missing) as url:
        error, lost = asyncio.run(ask(url))
    assert lost == [(url, "policy@v0007")]
    assert isinstance(error, BackendUnavailable)  # 503 with Retry-After: the SDKs retry, by then it is reloaded
    assert "being reloaded" in str(error)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_gets_504_at_once_and_vllm_is_let_go(
    make_client: Callable[..., TestClient], stream: bool
) -> None:
    generator = FakeGenerator(ANSWERS, delay_s=30)
    client = make_client(generator=generator, timeouts={"deadline_s": 60})
    body = {"model": "toy-bon", "messages": MESSAGES, "deadline_ms": 200, "stream": stream, "n_candidates": 1}
    started = time.monotonic()
    error = assert_error(client.post(CHAT, json=body), 504, code="deadline_exceeded")
    assert time.monotonic() - started < 15  # the deadline, not the generator's 30 s
    assert "200 ms" in error["message"]
    if not stream:
        assert generator.cancelled == 1  # the request to vLLM was closed (vLLM aborts it)


def test_the_config_bounds_the_deadline_a_client_may_ask(make_client: Callable[..., TestClient]) -> None:
    client = make_client(generator=FakeGenerator(ANSWERS, delay_s=30), timeouts={"deadline_s": 0.2})
    body = {"model": "toy-bon", "messages": MESSAGES, "deadline_ms": 600_000}
    error = assert_error(client.post(CHAT, json=body), 504, code="deadline_exceeded")
    assert "200 ms" in error["message"]


def test_scoring_gets_what_is_left_of_the_deadline(make_client: Callable[..., TestClient]) -> None:
    client = make_client(
        generator=FakeGenerator(ANSWERS, delay_s=0.1), scorer=FakeScorer({}, delay_s=30),
        scorer_settings={"on_failure": "fail_open", "deadline_ms": 60_000}, store={"score_unscored": False},
    )  # fmt: skip
    started = time.monotonic()
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "deadline_ms": 500})
    assert time.monotonic() - started < 15  # not the scorer's 30 s, nor its own 60 s deadline
    assert response.status_code == 200
    assert response.headers["x-bon-degraded"] == "scorer_timeout"


def test_fail_closed_scoring_cut_by_the_request_s_deadline_is_a_504(make_client: Callable[..., TestClient]) -> None:
    client = make_client(
        generator=FakeGenerator(ANSWERS, delay_s=0.1), scorer=FakeScorer({}, delay_s=30),
        scorer_settings={"deadline_ms": 60_000}, store={"score_unscored": False},
    )  # fmt: skip
    response = client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, "deadline_ms": 500})
    assert_error(response, 504, code="deadline_exceeded")  # the client's deadline, not the reward model's failure
