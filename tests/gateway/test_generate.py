"""A streamed best-of-N put back together (``VLLMGenerator.generate`` with ``on_finished``), over real HTTP from a
scripted backend that streams as vLLM does: choices interleaved, token ids and log-probs per chunk, usage last."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.errors import BackendFailed
from gateway.generate import Candidate, Generation, VLLMGenerator
from gateway.settings import Backend
from tests.gateway.backends import chat_backend

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "policy"}


def _chunk(index: int, delta: dict[str, Any], token: int | None = None, finish: str | None = None) -> dict[str, Any]:
    logprobs = {"content": [{"token": str(token), "logprob": -0.5, "bytes": None, "top_logprobs": []}]} if token else None
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
              **({"token_ids": [token]} if token else {})}  # fmt: skip
    return {**BASE, "choices": [choice]}


STREAM = [
    {**_chunk(0, {"role": "assistant", "content": ""}), "prompt_token_ids": [1, 2, 3]},
    _chunk(1, {"role": "assistant", "content": ""}),
    _chunk(1, {"reasoning_content": "think"}),
    _chunk(0, {"content": "Seven"}, 11),
    _chunk(1, {"content": "7"}, 21),
    _chunk(1, {"content": "."}, 22, "stop"),  # candidate 1 finishes first
    _chunk(0, {"content": "."}, 12),
    _chunk(0, {}, 13, "length"),
    {**BASE, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
]


async def _sse(request: web.Request, events: list[dict[str, Any]], *, done: bool = True) -> web.StreamResponse:
    body = await request.json()
    assert (body["stream"], body["n"], body["stream_options"]) == (True, 2, {"include_usage": True})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    if done:
        await response.write(b"data: [DONE]\n\n")
    return response


async def _generate(url: str) -> tuple[Generation, list[int]]:
    finished: list[int] = []
    async with aiohttp.ClientSession() as session:
        generator = VLLMGenerator(session, [Backend(url=url, model="policy")], request_timeout_s=10)
        generation = await generator.generate({"messages": []}, 2, None, lambda c: finished.append(c.index))
    return generation, finished


def test_a_streamed_best_of_n_is_the_same_generation_and_each_candidate_is_handed_over_when_it_finishes() -> None:
    async def handler(request: web.Request, stopping: asyncio.Event) -> web.StreamResponse:
        return await _sse(request, STREAM)

    with chat_backend(handler) as url:
        generation, finished = asyncio.run(_generate(url))
    assert finished == [1, 0]
    logprob: dict[str, Any] = {"logprob": -0.5, "bytes": None, "top_logprobs": []}
    assert generation == Generation(
        [
            Candidate(0, "Seven.", "length", [11, 12, 13], {"content": [{"token": t, **logprob} for t in ("11", "12", "13")]}),
            Candidate(1, "7.", "stop", [21, 22], {"content": [{"token": t, **logprob} for t in ("21", "22")]},
                      message={"reasoning_content": "think"}),
        ],
        prompt_tokens=3, completion_tokens=5, backend=url,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("events", "message"),
    [([*STREAM[:4], {"error": {"message": "engine dead", "code": 500}}], "engine dead"), (STREAM[:1], "ended with 1 of 2")],
)
def test_a_stream_that_breaks_is_a_backend_failure(events: list[dict[str, Any]], message: str) -> None:
    async def handler(request: web.Request, stopping: asyncio.Event) -> web.StreamResponse:
        return await _sse(request, events, done=False)

    with chat_backend(handler) as url, pytest.raises(BackendFailed, match=message):
        asyncio.run(_generate(url))


def test_a_candidate_without_a_finish_reason_is_kept_but_not_handed_over() -> None:
    async def handler(request: web.Request, stopping: asyncio.Event) -> web.StreamResponse:
        return await _sse(request, STREAM[:6])  # candidate 0 never said it finished

    with chat_backend(handler) as url:
        generation, finished = asyncio.run(_generate(url))
    assert finished == [1]
    assert [(c.text, c.finish_reason) for c in generation.candidates] == [("Seven", None), ("7.", "stop")]
