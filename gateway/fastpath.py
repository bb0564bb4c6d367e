"""``POST /v1/chat/completions`` straight to its handler, past FastAPI's routing, dependency solving and exception
middleware: a pure ASGI middleware, the one place the hot route is dispatched by hand.

Measured with ``python -m loadtest.bench profile`` (py-spy, N=1 in front of a 0 ms mock): FastAPI's and Starlette's
request machinery around the handler (route matching over every route, the exception and exit-stack middleware,
solving the ``State``/``KeyId`` dependencies) was a quarter of the gateway's CPU per request. This path resolves the
same state and API key with the same functions the dependencies use (``gateway.state``), calls the same handler
(``gateway.routes.chat_completions``) and answers a ``GatewayError`` with the app's own handler, so behaviour is the
route's; an unexpected exception still reaches the app's 500 handler (``ServerErrorMiddleware`` sits outside this).
The route stays registered with FastAPI for the OpenAPI document. Knows dispatch only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.routes import chat_completions
from gateway.state import GatewayState, chat_key_id

PATH = "/v1/chat/completions"
ErrorResponder = Callable[[Request, GatewayError], Awaitable[Response]]


class ChatFastPath:
    def __init__(self, app: ASGIApp, on_error: ErrorResponder) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        state: GatewayState = scope["app"].state.gateway
        try:
            response = await chat_completions(request, state, chat_key_id(request, state))
        except GatewayError as exc:
            response = await self.on_error(request, exc)
        await response(scope, receive, send)
