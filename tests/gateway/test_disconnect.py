"""A client that walks away: the gateway lets go of its request to the model backend.

Letting go means closing the backend connection, which is what makes vLLM abort the request
(``tests/e2e/test_gateway.py`` checks vLLM's side). Here the backend is scripted over real HTTP
and never finishes on its own: it answers a stream with one chunk and then holds it open, and
never answers a plain request. It notes when the gateway closes the connection, so every
moment of the request is under the test's control, whatever the machine's speed. The gateway
runs under uvicorn so the client can really hang up.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.metrics import sample
from gateway.store.records import CompletionRecord
from tests.gateway.backends import chat_backend
from tests.gateway.conftest import REWARDS, settings
from tests.gateway.fakes import FakeScorer, FakeStore
from tests.polling import wait_until
from tests.serving import serving

MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]
FIRST_CHUNK = {
    "id": "chatcmpl-endless",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "policy",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Sure"}, "finish_reason": None}],
}


@dataclass
class EndlessBackend:
    """What the scripted backend saw: requests that arrived, and those whose client closed the connection."""

    url: str = ""
    received: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    closed: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))


@pytest.fixture
def endless_backend() -> Iterator[EndlessBackend]:
    seen = EndlessBackend()

    async def chat(request: web.Request, stopping: asyncio.Event) -> web.StreamResponse:
        body = await request.json()
        seen.received.release()
        try:
            if body.get("stream"):
                response = web.StreamResponse(headers={"content-type": "text/event-stream"})
                await response.prepare(request)
                await response.write(b"data: " + json.dumps(FIRST_CHUNK).encode() + b"\n\n")
            await stopping.wait()  # never finishes: only the client's leaving ends it
            raise AssertionError("unreachable while the test runs")
        except asyncio.CancelledError:  # handler_cancellation: the connection was closed
            seen.closed.release()
            raise

    with chat_backend(chat, handler_cancellation=True) as url:
        seen.url = url
        yield seen


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_walks_away_closes_the_backend_request(
    endless_backend: EndlessBackend, stream: bool, tmp_path: Path
) -> None:
    """Mid-stream (after the first chunk is relayed) or while best-of-N waits for its candidates; either way the
    request is logged, marked cancelled, with what was generated so far."""
    store = FakeStore()
    app = create_app(
        settings(backends=[{"url": endless_backend.url, "model": "policy"}], store={"data_dir": str(tmp_path / "data")}),
        scorer=FakeScorer(REWARDS),
        store=store,
    )
    body = json.dumps({"model": "toy-bon", "messages": MESSAGES, "stream": stream, "n_candidates": 1 if stream else 4})
    with serving(app) as gateway:
        url = urlsplit(gateway)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n{body}".encode()
            )
            assert endless_backend.received.acquire(timeout=30), "the gateway did not call the backend"
            if stream:
                seen = b""
                while b"data: " not in seen:  # the first chunk is through
                    data = sock.recv(4096)
                    assert data, f"the gateway closed the stream: {seen!r}"
                    seen += data
                assert b'"content":"Sure"' in seen.replace(b" ", b"")
            assert not endless_backend.closed.acquire(timeout=0.2), "the backend request ended while its client was there"
        # the client has walked away
        assert endless_backend.closed.acquire(timeout=30), "the gateway kept its backend request open after the client left"
        if not stream:  # a plain request given up is counted as nginx's 499
            wait_until(lambda: (sample(gateway, "bon_requests_total", {"status": "499"}) or 0) == 1, 30, "no 499 counted")
        [record] = store.wait_for(lambda records: len(records) == 1, 30)
    assert isinstance(record, CompletionRecord)
    assert record.status == "cancelled"
    assert [c.text for c in record.candidates] == (["Sure"] if stream else [])  # what the client had been sent
    assert not any(c.chosen for c in record.candidates)
