"""An OpenAI-compatible chat backend that answers after a fixed delay (a 0 ms model).

Run as ``python -m loadtest.mock_backend --port P --delay-ms D``. It returns one fixed,
schema-valid completion per request (``n`` choices when asked, with per-token logprobs
and vLLM's ``token_ids`` when asked, as the gateway does; with ``stream: true`` the same
answers as server-sent chunks, one per token and sample, with vLLM's ``token_ids`` and a usage chunk),
so a benchmark measures what sits in front of it, not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

ANSWER = "Sure! 3 plus 4 is 7."
TOKENS = ["Sure", "!", " 3", " plus", " 4", " is", " 7", ".", "<|end|>"]


def _completion(n: int, logprobs: bool, token_ids: bool) -> bytes:
    choices: list[dict[str, object]] = []
    for i in range(n):
        choice: dict[str, object] = {"index": i, "message": {"role": "assistant", "content": ANSWER}, "logprobs": None}
        if logprobs:
            content = [{"token": t, "logprob": -0.05 * (k + 1), "bytes": list(t.encode()), "top_logprobs": []}
                       for k, t in enumerate(TOKENS)]  # fmt: skip
            choice["logprobs"] = {"content": content}
        if token_ids:
            choice["token_ids"] = [100 + k for k in range(len(TOKENS))]
        choice["finish_reason"] = "stop"
        choices.append(choice)
    body = {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "policy",
        "choices": choices,
        "usage": {"prompt_tokens": 12, "completion_tokens": 9 * n, "total_tokens": 12 + 9 * n},
    }
    return json.dumps(body).encode()


def _stream(n: int) -> bytes:
    """The answer as vLLM streams ``n`` samples: each chunk carries one choice, the samples' chunks interleaved."""
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()), "model": "policy"}
    deltas = [{"role": "assistant", "content": ""}, *({"content": t} for t in TOKENS[:-1])]
    events = []
    for k, delta in enumerate(deltas):
        for i in range(n):
            ids = [100 + k - 1] if k else []
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None, "token_ids": ids}
            events.append({**base, "choices": [choice], **({"prompt_token_ids": [1, 2, 3]} if k == 0 else {})})
    for i in range(n):
        last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop", "token_ids": [108]}
        events.append({**base, "choices": [last]})
    usage = {"prompt_tokens": 12, "completion_tokens": 9 * n, "total_tokens": 12 + 9 * n}
    events.append({**base, "choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def app(delay_s: float) -> web.Application:
    cached = {(n, lp, ids): _completion(n, lp, ids) for n in range(1, 17) for lp in (False, True) for ids in (False, True)}
    streams = {n: _stream(n) for n in range(1, 17)}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        if delay_s:
            await asyncio.sleep(delay_s)
        if body.get("stream"):
            return web.Response(body=streams[int(body.get("n") or 1)], content_type="text/event-stream")
        key = (int(body.get("n") or 1), bool(body.get("logprobs")), bool(body.get("return_token_ids")))
        return web.Response(body=cached[key], content_type="application/json")

    return chat_server(chat)


def chat_server(chat: Callable[[web.Request], Awaitable[web.Response]]) -> web.Application:
    """An app answering ``POST /v1/chat/completions`` with ``chat`` and ``GET /health`` with ok (the proxy's too)."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/health", health)
    return application


def serve(application: web.Application, port: int) -> None:
    """Run ``application`` on loopback, quietly (no banner, no access log: a benchmark measures it)."""
    web.run_app(application, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    serve(app(args.delay_ms / 1000), args.port)


if __name__ == "__main__":
    main()
