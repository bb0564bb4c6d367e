"""Input limits, each a clear 4xx naming the field, and the cap on requests in flight (503 at once, nothing lost).

The overload tests run the app under uvicorn with a generator the test holds back, so every moment is the test's:
which requests are in flight is known, not timed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.generate import Finished, Generation
from gateway.metrics import sample
from tests.gateway.conftest import ANSWERS, REWARDS, settings
from tests.gateway.fakes import FakeGenerator, FakeScorer, FakeStore
from tests.gateway.test_errors import CHAT, MESSAGES, assert_error
from tests.polling import wait_until
from tests.serving import serving


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


@pytest.mark.parametrize(
    ("limits", "body", "param", "code"),
    [
        ({"max_messages": 2}, {"messages": MESSAGES * 3}, "messages", "too_many_messages"),
        (
            {"max_message_chars": 10},
            {"messages": [{"role": "user", "content": "x" * 11}]},
            "messages.0.content",
            "message_too_long",
        ),
        (
            {"max_message_chars": 10, "max_total_chars": 15},
            {
                "messages": [
                    {"role": "system", "content": "x" * 8},
                    {"role": "user", "content": [{"type": "text", "text": "y" * 8}]},
                ]
            },
            "messages",
            "messages_too_long",
        ),
        ({"max_candidate_tokens": 100}, {"n_candidates": 4, "max_tokens": 26}, "n_candidates", "budget_exceeded"),
    ],
)
def test_each_limit_is_a_400_naming_its_field(
    make_client: Callable[..., TestClient], limits: dict[str, Any], body: dict[str, Any], param: str, code: str
) -> None:
    generator = FakeGenerator(ANSWERS)
    client = make_client(generator=generator, limits=limits)
    assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES, **body}), 400, param=param, code=code)
    assert generator.calls == []


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(make_client: Callable[..., TestClient]) -> None:
    client = make_client(limits={"max_body_bytes": 2048})
    big = json.dumps({"model": "toy-bon", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert_error(client.post(CHAT, content=big, headers={"content-type": "application/json"}), 413, code="request_too_large")
    assert_error(client.post("/v1/feedback", content=big, headers={"content-type": "application/json"}), 413)
    # no Content-Length (chunked): refused while reading, though the client never sends the rest of the body
    app = create_app(settings(limits={"max_body_bytes": 2048}), generator=FakeGenerator(ANSWERS), scorer=FakeScorer(REWARDS))
    with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            sock.sendall(head.encode() + b"".join(b"%x\r\n%s\r\n" % (1024, big[i : i + 1024]) for i in range(0, 3072, 1024)))
            answer = b""
            while b"request_too_large" not in answer:  # the terminating chunk never comes: only an early answer gets here
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer


def test_a_relayed_stream_past_its_time_limit_ends_with_an_error_event(make_client: Callable[..., TestClient]) -> None:
    client = make_client(limits={"max_stream_s": 1e-9})
    with client.stream("POST", CHAT, json={"model": "toy-bon", "messages": MESSAGES, "stream": True, "n_candidates": 1}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "stream_too_long"


class HeldGenerator(FakeGenerator):
    """Answers once the test lets it (``release``); a stream sends its first chunk, then waits too."""

    def __init__(self) -> None:
        super().__init__(ANSWERS)
        self.release = threading.Event()
        self.waiting = 0
        """Requests that reached the generator (planned) and wait for ``release``."""

    async def generate(
        self, body: dict[str, Any], n: int, models: dict[str, str] | None = None, on_finished: Finished | None = None
    ) -> Generation:
        self.waiting += 1
        await asyncio.to_thread(self.release.wait, 60)
        return await super().generate(body, n, models, on_finished)

    async def stream(self, body: dict[str, Any], models: dict[str, str] | None = None) -> AsyncGenerator[bytes, None]:
        first = True
        async for payload in super().stream(body, models):
            yield payload
            if first:
                first = False
                await asyncio.to_thread(self.release.wait, 60)


def test_a_burst_over_the_in_flight_cap_gets_503_at_once_and_nothing_admitted_is_lost() -> None:
    cap, burst = 4, 12
    generator, store = HeldGenerator(), FakeStore()
    app = create_app(settings(limits={"max_in_flight": cap}), generator=generator, scorer=FakeScorer(REWARDS), store=store)
    body = {"model": "toy-bon", "messages": MESSAGES, "n_candidates": 2}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(burst) as pool:
        admitted = [pool.submit(client.post, CHAT, json=body) for _ in range(cap)]
        wait_until(lambda: sample(url, "bon_requests_in_flight") == cap, 30, "the first requests were not admitted")

        def timed() -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = client.post(CHAT, json=body)
            return response, time.perf_counter() - started

        refused = [f.result() for f in [pool.submit(timed) for _ in range(burst - cap)]]  # all while the cap is full
        generator.release.set()
        answered = [f.result() for f in admitted]
    for response, _ in refused:
        assert_error(response, 503, code="overloaded")
        assert int(response.headers["retry-after"]) >= 1
    assert [r.status_code for r in answered] == [200] * cap
    logged = store.wait_for(lambda records: len(records) == cap)
    assert sorted(r.id for r in logged) == sorted(r.json()["id"] for r in answered)  # type: ignore[union-attr]
    seconds = sorted(s for _, s in refused)
    slowest, median = 1000 * seconds[-1], 1000 * seconds[len(seconds) // 2]
    print(f"\noverload: {burst} requests at a cap of {cap}: {len(refused)} refused with 503 (slowest {slowest:.1f} ms, "
          f"median {median:.1f} ms); {cap} admitted, {len(logged)} logged")  # fmt: skip


def test_a_relayed_stream_holds_its_place_until_its_last_byte() -> None:
    generator = HeldGenerator()
    app = create_app(settings(limits={"max_in_flight": 1}), generator=generator, scorer=FakeScorer(REWARDS), store=FakeStore())
    stream = {"model": "toy-bon", "messages": MESSAGES, "stream": True, "n_candidates": 1}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", CHAT, json=stream) as relayed:
            lines = relayed.iter_lines()
            assert next(lines).startswith("data: ")  # the first chunk is through; the stream goes on
            assert_error(client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}), 503, code="overloaded")
            generator.release.set()
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        wait_until(lambda: sample(url, "bon_requests_in_flight") == 0, 10, "the stream was never counted as over")
        generator.release.set()
        assert client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).status_code == 200


def test_under_load_n_is_lowered_and_the_answer_says_so() -> None:
    generator = HeldGenerator()
    app = create_app(
        settings(limits={"max_in_flight": 8, "degrade_above": 1}),
        generator=generator,
        scorer=FakeScorer(REWARDS),
        store=FakeStore(),
    )
    body = {"model": "toy-bon", "messages": MESSAGES, "n_candidates": 4, "return_candidates": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, CHAT, json=body)  # in flight alone: full N
        wait_until(lambda: generator.waiting == 1, 30, "the first request did not reach the generator")
        second = pool.submit(client.post, CHAT, json=body)  # the second in flight: past degrade_above
        wait_until(lambda: generator.waiting == 2, 30, "the second request did not reach the generator")
        generator.release.set()
        full, lowered = first.result(), second.result()
        assert "x-bon-degraded" not in full.headers
        assert len(full.json()["candidates"]) == 4
        assert lowered.headers["x-bon-degraded"] == "overload"
        assert lowered.json()["degraded"] == "overload"
        assert len(lowered.json()["candidates"]) == 2  # still ranked by the reward model
        assert sample(url, "bon_degraded_total", {"reason": "overload"}) == 1
