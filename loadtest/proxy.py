"""The floor Python can reach: a minimal pass-through proxy for chat completions (aiohttp, one client session).

Run as ``python -m loadtest.proxy --port P --backend URL``. It forwards the body to the backend
and returns its answer, nothing else: no parsing, validation, logging or metrics. ``bench
overhead`` puts it beside the gateway, so what the gateway adds is judged against what any
Python proxy costs on the same machine in the same run.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

from loadtest.mock_backend import chat_server, serve


def app(backend: str) -> web.Application:
    async def session_ctx(application: web.Application):  # type: ignore[no-untyped-def]
        application["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await application["session"].close()

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"content-type": "application/json"}
        async with request.app["session"].post(f"{backend}/v1/chat/completions", data=body, headers=headers) as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")

    application = chat_server(chat)
    application.cleanup_ctx.append(session_ctx)
    return application


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    serve(app(args.backend), args.port)


if __name__ == "__main__":
    main()
