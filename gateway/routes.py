"""The HTTP routes, by name: thin handlers that parse, authenticate and hand over to the service.

``/v1/chat/completions`` (routes → ``service`` → generate → score → select → ``responses``,
the record logged by the service), ``/v1/feedback``, ``/v1/models``, the admin endpoints
(``/admin/policy``, ``/promote``, ``/rollback``, ``/admin/watch/clear``), ``/health``, ``/ready`` and ``/metrics``.
Knows request parsing, cancelling the work when a client goes away (which aborts the vLLM
request) and the access log line; errors are raised as ``GatewayError`` and turned into
OpenAI error JSON by the app's one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any, Literal, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from gateway import responses
from gateway.canary import GateBusy, NoCanary
from gateway.errors import (
    CompletionNotFound,
    Conflict,
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    StreamTooLong,
    UnsupportedMediaType,
)
from gateway.protocol import AdminAction, ChatCompletionRequest, FeedbackRequest
from gateway.prune import Leader
from gateway.quotas import Ticket
from gateway.service import Plan
from gateway.state import Admin, FeedbackKeyId, GatewayState, KeyId, State
from gateway.store.records import FeedbackRecord
from versioning import watch

log = structlog.get_logger("gateway")
router = APIRouter()
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State, key_id: KeyId) -> Response:
    started = time.perf_counter()
    request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
    headers = {"x-request-id": request_id, "x-policy-version": state.settings.policy_version}
    plan: Plan | None = None
    status = 500
    admitted = False

    def finish() -> None:
        """The request is over (for a stream: its last byte, or its client left): count and log it."""
        if admitted:
            state.in_flight -= 1
            state.metrics.in_flight.dec()
        if held is not None and state.swapper is not None:
            state.swapper.release(held)
        if ticket is not None:
            used = plan.used_tokens if plan is not None else None
            # a request that failed before generating gets its tokens back; one whose client left is charged in full
            state.quotas.settle(ticket, 0 if used is None and status not in (200, 499) else used)
        elapsed = time.perf_counter() - started
        state.metrics.requests.labels(str(status)).inc()
        stream = "true" if plan is not None and plan.streaming else "false"
        state.metrics.chat_latency[stream].observe(elapsed)
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

    streaming: AsyncIterator[bytes] | None = None
    ticket: Ticket | None = None
    held: str | None = None
    """The version this request runs on, held by the hot-swap until it is over (it is not unloaded meanwhile)."""
    try:
        cap = state.settings.limits.max_in_flight
        if cap and state.in_flight >= cap:
            raise Overloaded(f"the gateway is at its limit of {cap} requests in flight; retry shortly")
        admitted = True
        state.in_flight += 1
        state.metrics.in_flight.inc()
        body = await _parse(request, ChatCompletionRequest, state.settings.limits.max_body_bytes)
        plan = state.service.plan(body, key_id, state.in_flight)
        if state.swapper is not None:
            held = plan.policy_version
            state.swapper.hold(held)
        ticket = state.quotas.admit(key_id, plan.n_candidates, plan.max_tokens)
        headers.update(state.quotas.headers(key_id))
        headers["x-policy-version"] = plan.policy_version
        if plan.degraded:
            headers["x-bon-degraded"] = plan.degraded
        headers["x-bon-n"] = str(plan.n_candidates)
        if plan.adaptive is not None:
            headers["x-bon-adaptive"] = plan.adaptive
        if plan.n_candidates > 1:
            headers["x-bon-selection"] = plan.selection
        if plan.streaming and plan.selection == "prune" and plan.n_return == 1 and not plan.request.logprobs:
            leader = Leader()  # the answer streams as it decodes once pruning has left it alone
            run = asyncio.ensure_future(state.service.run(plan, leader))
            led = responses.led(plan, run, leader, state.settings.model_alias)
            first = await _unless_disconnected(request, _first(led, plan))
            status = 200
            streaming = responses.sse([first], _until(led, state.settings.limits.max_stream_s))
        elif plan.streaming and plan.n_candidates == 1:
            relay = state.service.relay(plan)
            first = await _unless_disconnected(request, _first(relay, plan))  # errors before the first byte keep their status
            status = 200
            tail = _until(relay, state.settings.limits.max_stream_s)
            streaming = responses.sse([first], tail)
        else:
            outcome = await _unless_disconnected(request, state.service.run(plan))  # logged by the service
            status = 200
            if outcome.degraded:
                headers["x-bon-degraded"] = ",".join(filter(None, (plan.degraded, outcome.degraded)))
            alias = state.settings.model_alias
            if not plan.streaming:
                return responses.JsonResponse(responses.completion(plan, outcome, alias), headers=headers)
            streaming = responses.sse(responses.chunks(plan, outcome, alias))
        return StreamingResponse(_then(streaming, finish), media_type="text/event-stream", headers=headers)
    except GatewayError as exc:
        status = exc.status
        exc.headers.update(headers)
        raise
    except ClientDisconnected:
        status = 499
        return Response(status_code=499)
    finally:
        if streaming is None:
            finish()


async def _then(body: AsyncIterator[bytes], finish: Callable[[], None]) -> AsyncIterator[bytes]:
    """``body``, then ``finish()`` once it is over, however it ends (done, failed, or its client left)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        finish()


async def _first(relay: AsyncGenerator[bytes, None], plan: Plan) -> bytes:
    """A relayed stream's first payload, within the request's deadline (504 ``deadline_exceeded`` past it)."""
    try:
        async with asyncio.timeout(plan.left_s()):
            return await anext(relay)
    except TimeoutError:
        await relay.aclose()
        raise DeadlineExceeded(f"no first token within the request's deadline of {plan.deadline_s * 1000:.0f} ms") from None


async def _until(relay: AsyncGenerator[bytes, None], limit_s: float) -> AsyncIterator[bytes]:
    """A relayed stream's payloads for ``limit_s`` (``limits.max_stream_s``); then an error event, the end, and vLLM's
    request closed. Checked per payload, no timer per token: a stream that stalls is ended by ``timeouts.request_s``."""
    deadline = time.monotonic() + limit_s
    async with contextlib.aclosing(relay):
        async for payload in relay:
            if time.monotonic() > deadline:
                error = StreamTooLong(f"the stream ran past this gateway's limit of {limit_s:.0f} s and was ended")
                yield orjson.dumps(error.body())
                yield b"[DONE]"
                return
            yield payload


@router.post("/v1/feedback")
async def feedback(request: Request, state: State, key_id: FeedbackKeyId) -> dict[str, Any]:
    """A thumb on one of the caller's own completions; a repeat replaces the previous one."""
    body = await _parse(request, FeedbackRequest, state.settings.limits.max_body_bytes)
    if not state.service.ids.owned_by(body.completion_id, key_id):
        raise CompletionNotFound(f"no completion '{body.completion_id}' for this API key", param="completion_id")
    if len(body.comment or "") > state.settings.feedback.max_comment_chars:
        raise InvalidRequest(f"comment is longer than {state.settings.feedback.max_comment_chars} characters", param="comment")
    wait = state.feedback_limit.allow(key_id)
    if wait:
        raise RateLimited(f"too much feedback from this API key; retry in {math.ceil(wait)} s", wait)
    await state.service.feedback(FeedbackRecord(body.completion_id, key_id, body.thumb, body.comment, time.time()))
    return {"object": "feedback", "completion_id": body.completion_id, "thumb": body.thumb, "status": "accepted"}


@router.get("/v1/models")
async def models(state: State, key_id: KeyId) -> dict[str, Any]:
    alias = state.settings.model_alias
    return {"object": "list", "data": [{"id": alias, "object": "model", "created": state.started, "owned_by": "bon-gateway"}]}


@router.get("/admin/policy", dependencies=[Admin])
async def policy_status(state: State) -> dict[str, Any]:
    """What is served now: the current and canary versions, the canary's share, the gate's last look and the running
    trial (what it is judged on, its planned looks and the sample it needs, answers and thumbs per arm)."""
    swapper, gate = state.swapper, state.gate
    return {
        "object": "policy_status",
        "current": swapper.route.version if swapper else state.settings.policy_version,
        "canary": swapper.canary.version if swapper and swapper.canary else None,
        "canary_fraction": state.settings.canary.fraction,
        "canary_auto": state.settings.canary.auto,
        "last_look": asdict(gate.last) if gate is not None and gate.last is not None else None,
        "trial": asdict(gate.trial) if gate is not None and gate.trial is not None and swapper and swapper.canary else None,
        "watch": asdict(watch.read(gate.registry_root)) if gate is not None else None,
    }


@router.post("/admin/policy/promote", dependencies=[Admin])
async def promote(request: Request, state: State) -> dict[str, Any]:
    """The canary becomes current; every gateway follows the pointer within ``swap.poll_s``."""
    return await _decide_by_hand(request, state, "promote")


@router.post("/admin/policy/rollback", dependencies=[Admin])
async def rollback(request: Request, state: State) -> dict[str, Any]:
    """The canary is dropped; without one, current goes back to the version it replaced."""
    return await _decide_by_hand(request, state, "rollback")


@router.post("/admin/watch/clear", dependencies=[Admin])
async def clear_watch(request: Request, state: State) -> dict[str, Any]:
    """Clear the reward-hacking watch: scheduled training rounds resume (it fires again only about a newer version)."""
    if state.gate is None:
        raise Conflict("hot-swap is disabled on this gateway (swap.enabled: false): there is no registry to clear it in")
    raw = await _read(request, state.settings.limits.max_body_bytes)
    body = _validate(request, raw, AdminAction) if raw else AdminAction()
    cleared = await asyncio.to_thread(state.gate.clear_watch, body.reason or "cleared by hand")
    return {"object": "watch", **asdict(cleared)}


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State) -> dict[str, Any]:
    service = state.service
    checks = {
        "generator": await service.generator.ready(),
        "scorer": True if service.scorer is None else await service.scorer.ready(),
        "warm": state.warm,
    }
    if not all(checks.values()):
        raise NotReady("not ready: " + ", ".join(name for name, ok in checks.items() if not ok))
    return {"status": "ready", "checks": checks}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    payload, content_type = state.metrics.exposition()
    return Response(payload, media_type=content_type)


async def _decide_by_hand(request: Request, state: GatewayState, action: Literal["promote", "rollback"]) -> dict[str, Any]:
    if state.gate is None:
        raise Conflict("hot-swap is disabled on this gateway (swap.enabled: false): there are no versions to move")
    raw = await _read(request, state.settings.limits.max_body_bytes)
    body = _validate(request, raw, AdminAction) if raw else AdminAction()
    try:
        look = await asyncio.to_thread(state.gate.decide_by_hand, action, body.reason or f"{action} by hand")
    except NoCanary as exc:
        raise Conflict(str(exc)) from None
    except GateBusy as exc:
        raise Conflict(str(exc), code="gate_busy") from None
    return {"object": "policy_decision", **asdict(look)}


async def _parse(request: Request, model: type[M], limit: int) -> M:
    return _validate(request, await _read(request, limit), model)


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused (413) from its Content-Length, or as soon as more than ``limit`` bytes arrived."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared)} bytes; this gateway takes at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over this gateway's limit of {limit} bytes")
    return bytes(body)


def _validate(request: Request, raw: bytes, model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if "application/json" not in content_type.lower():
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {content_type or 'none'!r}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
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
    """Await ``work`` in this task unless the client disconnects first: then a watcher cancels this task's wait (which
    aborts the vLLM request) and ``ClientDisconnected`` is raised. One watcher task per request and no other (measured:
    running ``work`` as a task of its own beside the watcher and ``asyncio.wait`` on both was ~5% of the CPU per request)."""
    task = asyncio.current_task()
    assert task is not None
    over = left = False

    async def watch() -> None:
        nonlocal left
        await _disconnected(request)
        if not over:
            left = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:  # the watcher's cancellation, not the server's (shutdown)
            raise ClientDisconnected from None
        raise
    finally:
        over = True
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
