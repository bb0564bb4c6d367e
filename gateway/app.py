"""The FastAPI application: thin routes, state built in the lifespan, one error handler.

Knows the HTTP surface (``/v1/chat/completions``, ``/v1/feedback``, ``/v1/models``,
``/health``, ``/ready``, ``/metrics``, ``/admin/policy[/promote|/rollback]``), request parsing and
authentication (API keys; the admin token), cancelling
work when a client goes away, and how every error becomes OpenAI error JSON. The pipeline
itself is in ``service.py``; generators, scorers and the log writer are built here once
and injected.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import aiohttp
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import AdminGuard, KeyRing
from gateway.blue_green import launcher
from gateway.canary import CanaryGate, GateBusy, NoCanary, Totals
from gateway.errors import (
    CompletionNotFound,
    Conflict,
    GatewayError,
    InvalidRequest,
    NotReady,
    RateLimited,
    UnsupportedMediaType,
)
from gateway.generate import Generator, VLLMGenerator
from gateway.ids import CompletionIds, load_or_create_secret
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.protocol import AdminAction, ChatCompletionRequest, FeedbackRequest
from gateway.reward_follow import RewardModelFollower
from gateway.score import LocalRewardModel, RemotePoolingScorer, Scorer
from gateway.service import ChatService, Plan
from gateway.settings import GatewaySettings
from gateway.store import RecordWriter, Spool, SqlStore, Store, WriterStats
from gateway.store.records import FeedbackRecord
from gateway.swap import Swapper
from gateway.vllm_process import VLLMProcess

log = structlog.get_logger("gateway")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass
class GatewayState:
    settings: GatewaySettings
    service: ChatService
    keys: KeyRing
    metrics: Metrics
    feedback_limit: RateLimiter
    admin: AdminGuard
    writer: RecordWriter | None = None
    swapper: Swapper | None = None
    gate: CanaryGate | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    fatal: str | None = None
    """Why the gateway is shutting itself down (e.g. its managed vLLM died); the CLI exits non-zero."""


class ClientDisconnected(Exception):
    pass


async def _state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a sync dependency in a worker thread (measured: ~15% of the CPU per request)
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(_state)]


async def _key_id(request: Request, state: State) -> str:
    return state.keys.identify(request.headers.get("authorization"))


KeyId = Annotated[str, Depends(_key_id)]


async def _admin(request: Request, state: State) -> None:
    state.admin.check(request.headers.get("authorization"))


Admin = Depends(_admin)


def _scorer(settings: GatewaySettings, session: aiohttp.ClientSession) -> Scorer:
    s = settings.scorer
    if s.kind == "remote":
        assert s.remote_url is not None  # checked by the settings
        return RemotePoolingScorer(session, s.remote_url, s.remote_model, s.model_dir, s.version)
    return LocalRewardModel(s.model_dir, s.version, s.device, s.threads, s.max_batch, s.batch_wait_ms)


def _scorer_factory(settings: GatewaySettings, session: aiohttp.ClientSession) -> Callable[[Path, str], Scorer]:
    """How the reward-model follower builds the scorer of a registry version (its directory, its name).

    Local: the version's weights in this process. Remote: the pooling server must serve the version under its
    name (``--served-model-name v0003``: a rollout of the pooling server, which the gateway does not start);
    until it lists that name, the follower retries and the old version keeps scoring. Its tokenizer is the
    version directory's."""
    s = settings.scorer
    if s.kind == "remote":
        assert s.remote_url is not None  # checked by the settings
        url = s.remote_url

        def remote(path: Path, version: str) -> Scorer:
            model = s.remote_model if version == s.version else version
            return RemotePoolingScorer(session, url, model, path, version, require_listed=version != s.version)

        return remote
    return lambda path, version: LocalRewardModel(path, version, s.device, s.threads, s.max_batch, s.batch_wait_ms)


def _writer(settings: GatewaySettings, metrics: Metrics, store: Store | None) -> RecordWriter:
    s = settings.store
    if store is None:
        sql = SqlStore(s.database_url(), connect_timeout_s=s.connect_timeout_s)
        sql.migrate()
        store = sql
    stats = WriterStats(
        logged=metrics.records_logged.inc,
        spooled=metrics.records_spooled.inc,
        write_error=lambda kind: metrics.log_write_errors.labels(kind).inc(),
    )
    writer = RecordWriter(
        store, Spool(s.data_dir / "spool"), queue_size=s.queue_size, batch_size=s.batch_size,
        flush_interval_s=s.flush_interval_ms / 1000, retry_s=s.retry_s, stats=stats,
    )  # fmt: skip
    metrics.watch_log(lambda: writer.queue_depth, lambda: writer.spool.pending)
    return writer


def _ids(settings: GatewaySettings) -> CompletionIds:
    secret = settings.store.id_secret
    if secret is not None:
        return CompletionIds(secret.get_secret_value().encode())
    if not settings.store.enabled:  # nothing on disk: ids are checkable for this process's lifetime
        return CompletionIds(os.urandom(32))
    return CompletionIds(load_or_create_secret(settings.store.data_dir / "id_secret"))


async def _watch(process: VLLMProcess, state: GatewayState, on_fatal: Callable[[str], None]) -> None:
    """Stop the gateway (the CLI then exits non-zero) when its managed vLLM dies."""
    while process.returncode() is None:
        await asyncio.sleep(1.0)
    code = process.returncode()
    state.fatal = f"the managed vLLM exited with code {code}; its log ({process.log_path}) ends:\n{process.log_tail()}"
    log.error("vllm_died", returncode=code, log=str(process.log_path))
    await asyncio.to_thread(process.stop)  # its engine-core child may still be alive
    on_fatal(state.fatal)


def create_app(
    settings: GatewaySettings,
    *,
    generator: Generator | None = None,
    scorer: Scorer | None = None,
    store: Store | None = None,
    vllm: VLLMProcess | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. ``generator``, ``scorer`` and ``store`` replace the real ones (unit tests pass
    fakes); ``vllm`` is a managed server already started by the caller, watched while
    serving; ``on_fatal`` is called when it dies (the CLI stops its server then)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=settings.timeouts.keepalive_s)
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.timeouts.connect_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            gen = generator or VLLMGenerator(session, settings.all_backends(), settings.timeouts.request_s)
            score: Scorer | None = scorer
            if score is None and settings.scoring_enabled:
                score = _scorer(settings, session)
            if score is not None:
                await score.start()
            metrics.set_versions(settings.policy_version, score.version if score else "none")
            writer = await asyncio.to_thread(_writer, settings, metrics, store) if settings.store.enabled else None
            if writer is not None:
                writer.start()
            swapper: Swapper | None = None
            if generator is None and settings.swap.enabled:
                registry_dir = settings.registry_dir()
                await asyncio.to_thread(registry_dir.mkdir, parents=True, exist_ok=True)
                swap = settings.swap
                launch = launcher(settings.managed_vllm, Path("logs"), swap.full_cpu_binds) if swap.full == "blue_green" else None
                swapper = Swapper(session, settings.all_backends(), settings.policy_version, settings.swap, registry_dir,
                                  metrics, launch, settings.canary.fraction)  # fmt: skip
                await swapper.sync()  # serve the registry's current version from the first request on
            route = swapper.route_for if swapper is not None else None
            service = ChatService(settings, gen, score, metrics, _ids(settings), writer, route)
            rm_follower: RewardModelFollower | None = None
            if scorer is None and score is not None and settings.swap.enabled:
                rm_follower = RewardModelFollower(service, _scorer_factory(settings, session), settings.scorer.model_dir,
                                                  settings.scorer.version, settings.registry_dir(), metrics,
                                                  settings.swap.poll_s, settings.swap.retry_s)  # fmt: skip
                await rm_follower.sync()  # score with the registry's current reward model from the first request on
            gate: CanaryGate | None = None
            if settings.swap.enabled:  # moves the registry's pointers; the swapper (when there is one) follows them
                totals = writer.store if writer is not None and isinstance(writer.store, Totals) else None
                gate = CanaryGate(
                    settings.registry_dir(), totals, lambda: service.scorer.version if service.scorer else None,
                    settings.policy_version, settings.canary, metrics,
                    settings.store.database_url() if settings.store.enabled else None,
                )  # fmt: skip
            limit = RateLimiter(settings.feedback.per_minute, settings.feedback.burst)
            keys = KeyRing(settings.api_keys)
            admin = AdminGuard(settings.admin_token, settings.host, keys)
            state = GatewayState(settings, service, keys, metrics, limit, admin, writer, swapper, gate)
            app.state.gateway = state
            stop = on_fatal or (lambda message: signal.raise_signal(signal.SIGTERM))
            watcher = asyncio.create_task(_watch(vllm, state, stop)) if vllm is not None else None
            follower = asyncio.create_task(swapper.run()) if swapper is not None else None
            rm_task = asyncio.create_task(rm_follower.run()) if rm_follower is not None else None
            gate_task = asyncio.create_task(gate.run()) if gate is not None and gate.automatic else None
            try:
                yield
            finally:
                tasks = [task for task in (watcher, follower, rm_task, gate_task) if task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)  # a cancelled blue-green start stops its vLLM
                if swapper is not None:
                    await swapper.close()  # blue-green instances it started
                await service.drain()  # background scoring of N=1 answers for the log
                if writer is not None:
                    await asyncio.to_thread(writer.close)  # everything accepted reaches the database or the spool
                    if store is None:
                        await asyncio.to_thread(writer.store.close)
                if rm_follower is not None:
                    await rm_follower.close()
                if service.scorer is not None:
                    await service.scorer.close()  # the one scoring now (a follower may have replaced the first)

    app = FastAPI(title="bon-gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, state: State, key_id: KeyId) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
        headers = {"x-request-id": request_id, "x-policy-version": state.settings.policy_version}
        plan: Plan | None = None
        status = 500
        state.metrics.in_flight.inc()
        try:
            plan = state.service.plan(await _parse(request, ChatCompletionRequest), key_id)
            headers["x-policy-version"] = plan.policy_version
            if plan.streaming and plan.n_candidates == 1:
                relay = state.service.relay(plan)
                first = await _unless_disconnected(request, anext(relay))  # errors before the first byte keep their status
                status = 200
                return StreamingResponse(_sse([first], relay), media_type="text/event-stream", headers=headers)
            outcome = await _unless_disconnected(request, state.service.run(plan))
            status = 200
            state.service.log(plan, outcome)
            if plan.streaming:
                return StreamingResponse(
                    _sse(state.service.chunks(plan, outcome)), media_type="text/event-stream", headers=headers
                )
            return JSONResponse(state.service.response(plan, outcome), headers=headers)
        except GatewayError as exc:
            status = exc.status
            exc.headers.update(headers)
            raise
        except ClientDisconnected:
            status = 499
            return Response(status_code=499)
        finally:
            state.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            state.metrics.requests.labels(str(status)).inc()
            stream = "true" if plan is not None and plan.streaming else "false"
            state.metrics.request_latency.labels("chat_completions", stream).observe(elapsed)
            log.info(
                "chat_completion",
                request_id=request_id,
                key_id=key_id,
                status=status,
                ms=round(elapsed * 1000, 2),
                n_candidates=plan.n_candidates if plan else None,
                n=plan.n_return if plan else None,
                stream=stream,
                stages_ms={k: round(v * 1000, 2) for k, v in plan.timings.items()} if plan else None,
                **({"messages": [m.model_dump() for m in plan.request.messages]} if plan and state.settings.log_prompts else {}),
            )

    @app.post("/v1/feedback")
    async def feedback(request: Request, state: State, key_id: KeyId) -> dict[str, Any]:
        """A thumb on one of the caller's own completions; a repeat replaces the previous one."""
        body = await _parse(request, FeedbackRequest)
        if not state.service.ids.owned_by(body.completion_id, key_id):
            raise CompletionNotFound(f"no completion '{body.completion_id}' for this API key", param="completion_id")
        if len(body.comment or "") > state.settings.feedback.max_comment_chars:
            raise InvalidRequest(
                f"comment is longer than {state.settings.feedback.max_comment_chars} characters", param="comment"
            )
        wait = state.feedback_limit.allow(key_id)
        if wait:
            raise RateLimited(f"too much feedback from this API key; retry in {wait:.0f} s", wait)
        state.service.feedback(FeedbackRecord(body.completion_id, key_id, body.thumb, body.comment, time.time()))
        return {"object": "feedback", "completion_id": body.completion_id, "thumb": body.thumb, "status": "accepted"}

    @app.get("/v1/models")
    async def models(state: State, key_id: KeyId) -> dict[str, Any]:
        alias = state.settings.model_alias
        return {"object": "list", "data": [{"id": alias, "object": "model", "created": state.started, "owned_by": "bon-gateway"}]}

    @app.get("/admin/policy", dependencies=[Admin])
    async def policy_status(state: State) -> dict[str, Any]:
        """What is served now: the current and canary versions, the canary's share and the gate's last look."""
        swapper, gate = state.swapper, state.gate
        return {
            "object": "policy_status",
            "current": swapper.route.version if swapper else state.settings.policy_version,
            "canary": swapper.canary.version if swapper and swapper.canary else None,
            "canary_fraction": state.settings.canary.fraction,
            "canary_auto": state.settings.canary.auto,
            "last_look": asdict(gate.last) if gate is not None and gate.last is not None else None,
        }

    @app.post("/admin/policy/promote", dependencies=[Admin])
    async def promote(request: Request, state: State) -> dict[str, Any]:
        """The canary becomes current; every gateway follows the pointer within ``swap.poll_s``."""
        return await _decide_by_hand(request, state, "promote")

    @app.post("/admin/policy/rollback", dependencies=[Admin])
    async def rollback(request: Request, state: State) -> dict[str, Any]:
        """The canary is dropped; without one, current goes back to the version it replaced."""
        return await _decide_by_hand(request, state, "rollback")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(state: State) -> dict[str, Any]:
        service = state.service
        checks = {
            "generator": await service.generator.ready(),
            "scorer": True if service.scorer is None else await service.scorer.ready(),
        }
        if not all(checks.values()):
            raise NotReady("not ready: " + ", ".join(name for name, ok in checks.items() if not ok))
        return {"status": "ready", "checks": checks}

    @app.get("/metrics")
    async def metrics(state: State) -> Response:
        payload, content_type = state.metrics.exposition()
        return Response(payload, media_type=content_type)

    return app


async def _decide_by_hand(request: Request, state: GatewayState, action: Literal["promote", "rollback"]) -> dict[str, Any]:
    if state.gate is None:
        raise Conflict("hot-swap is disabled on this gateway (swap.enabled: false): there are no versions to move")
    body = await _parse(request, AdminAction) if await request.body() else AdminAction()
    try:
        look = await asyncio.to_thread(state.gate.decide_by_hand, action, body.reason or f"{action} by hand")
    except NoCanary as exc:
        raise Conflict(str(exc)) from None
    except GateBusy as exc:
        raise Conflict(str(exc), code="gate_busy") from None
    return {"object": "policy_decision", **asdict(look)}


async def _parse(request: Request, model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if "application/json" not in content_type.lower():
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {content_type or 'none'!r}")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (which aborts the vLLM request)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(head: Iterable[bytes], tail: AsyncIterator[bytes] | None = None) -> AsyncIterator[bytes]:
    for payload in head:
        yield b"data: " + payload + b"\n\n"
    if tail is not None:
        async for payload in tail:
            yield b"data: " + payload + b"\n\n"


def _error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        state: GatewayState | None = getattr(request.app.state, "gateway", None)
        if state is not None:
            state.metrics.errors.labels(exc.type, exc.code or "none").inc()
        return _error_response(exc, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = InvalidRequest(
            f"{request.method} {request.url.path}: {exc.detail}", code="not_found" if exc.status_code == 404 else None
        )
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        error = GatewayError(f"internal error ({exc.__class__.__name__}); see the gateway log")
        return _error_response(error)
