"""Scripted model backends over real HTTP for the gateway's tests: what vLLM answers, or fails to, on demand."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from aiohttp import web

Handler = Callable[[web.Request, asyncio.Event], Awaitable[web.StreamResponse]]


@contextmanager
def chat_backend(handler: Handler, *, handler_cancellation: bool = False) -> Iterator[str]:
    """An HTTP server in a thread whose ``POST /v1/chat/completions`` is ``handler(request, stopping)``; yields its URL.
    ``stopping`` is set when the block ends (a handler that waits on it lets the server stop at once);
    ``handler_cancellation``: a handler is cancelled when its client closes the connection."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stopping = asyncio.Event()
    url = ""

    async def chat(request: web.Request) -> web.StreamResponse:
        return await handler(request, stopping)

    async def serve() -> None:
        nonlocal url
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()
        await stopping.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the scripted backend did not start"
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        loop.close()
