"""An OpenAI-compatible chat backend that answers after a fixed delay (a 0 ms model).

Run as ``python -m loadtest.mock_backend --port P --delay-ms D``. It returns one fixed,
schema-valid completion per request (``n`` choices when asked), so a benchmark measures
what sits in front of it, not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def _completion(n: int) -> bytes:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": "Sure! 3 plus 4 is 7."},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(n)
    ]
    body = {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "policy",
        "choices": choices,
        "usage": {"prompt_tokens": 12, "completion_tokens": 9 * n, "total_tokens": 12 + 9 * n},
    }
    return json.dumps(body).encode()


def app(delay_s: float) -> web.Application:
    cached = {n: _completion(n) for n in range(1, 17)}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(body=cached[int(body.get("n") or 1)], content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/health", health)
    return application


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    web.run_app(app(args.delay_ms / 1000), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
