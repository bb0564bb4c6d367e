"""The FastAPI application: the routes (``gateway.routes``), the lifespan (``gateway.lifespan``), one error handler.

Knows how the pieces are put together and how every error becomes OpenAI error JSON;
the routes are by name in their own module, state is built in the lifespan and injected
with ``Depends`` (``gateway.state``).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import inspector, openapi
from gateway.errors import GatewayError, InvalidRequest
from gateway.fastpath import ChatFastPath
from gateway.generate import Generator
from gateway.lifespan import lifespan
from gateway.routes import router
from gateway.score import Scorer
from gateway.settings import GatewaySettings
from gateway.state import GatewayState
from gateway.store import Store
from gateway.vllm_process import VLLMProcess
from gateway.workers import Slot

log = structlog.get_logger("gateway")


def create_app(
    settings: GatewaySettings,
    *,
    generator: Generator | None = None,
    scorer: Scorer | None = None,
    store: Store | None = None,
    vllm: VLLMProcess | None = None,
    on_fatal: Callable[[str], None] | None = None,
    slot: Slot | None = None,
) -> FastAPI:
    """The app. ``generator``, ``scorer`` and ``store`` replace the real ones (unit tests pass
    fakes); ``vllm`` is a managed server already started by the caller, watched while
    serving; ``on_fatal`` is called when it dies (the CLI stops its server then); ``slot``: this worker's, one of
    several (``gateway.workers``)."""
    app = FastAPI(
        title="bon-gateway", lifespan=lifespan(settings, generator, scorer, store, vllm, on_fatal, slot),
        description="OpenAI-compatible chat completions, best-of-N reranked by a reward model; thumbs feedback.",
        docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
    )  # fmt: skip
    _install_error_handlers(app)
    app.add_middleware(ChatFastPath, on_error=gateway_error)
    app.include_router(router)
    app.include_router(inspector.router)
    openapi.install(app)
    return app


def _error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
    """A ``GatewayError`` as OpenAI error JSON, counted (the handler of every route, the fast path's too)."""
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    if state is not None:
        state.metrics.errors.labels(exc.type, exc.code or "none").inc()
    return _error_response(exc, exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, gateway_error)  # type: ignore[arg-type]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = InvalidRequest(
            f"{request.method} {request.url.path}: {exc.detail}", code="not_found" if exc.status_code == 404 else None
        )
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        error = InvalidRequest(f"{param}: {first.get('msg', 'invalid')}", param=param)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        error = GatewayError(f"internal error ({exc.__class__.__name__}); see the gateway log")
        return _error_response(error)
