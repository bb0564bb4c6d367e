"""What every route needs, built once by the lifespan, and how routes get it (``Depends``).

Knows the gateway's per-process state (settings, the chat service, keys, metrics, the
feedback limit, the admin guard, the log writer, the swapper and the canary gate) and the
three dependencies routes declare: the state, the caller's API key id, the admin check.
Builds nothing itself (``gateway.lifespan`` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import AdminGuard, KeyRing, local_caller
from gateway.canary import CanaryGate
from gateway.limits import RateLimiter
from gateway.metrics import Metrics
from gateway.quotas import Quotas
from gateway.service import ChatService
from gateway.settings import GatewaySettings
from gateway.store import LogWriter
from gateway.swap import Swapper


@dataclass
class GatewayState:
    settings: GatewaySettings
    service: ChatService
    keys: KeyRing
    metrics: Metrics
    feedback_limit: RateLimiter
    admin: AdminGuard
    writer: LogWriter | None = None
    swapper: Swapper | None = None
    gate: CanaryGate | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    fatal: str | None = None
    """Why the gateway is shutting itself down (e.g. its managed vLLM died); the CLI exits non-zero."""
    warm: bool = False
    """The warm-up request went through (or ``warmup`` is off); ``/ready`` waits for it."""
    quotas: Quotas = field(default_factory=lambda: Quotas([]))
    in_flight: int = 0
    """Chat requests admitted and not over (a stream: until its last byte); capped by ``limits.max_in_flight``."""


async def _state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a sync dependency in a worker thread (measured: ~15% of the CPU per request)
    state: GatewayState = request.app.state.gateway
    return state


State = Annotated[GatewayState, Depends(_state)]


def _local(request: Request) -> bool:
    return local_caller(request.client.host if request.client else None, request.headers)


def chat_key_id(request: Request, state: GatewayState) -> str:
    """The caller's API key id for a chat request (raises ``AuthenticationFailed``/``PermissionDenied``)."""
    return state.keys.identify(request.headers.get("authorization"), _local(request), "chat")


async def _key_id(request: Request, state: State) -> str:
    return chat_key_id(request, state)


async def _feedback_key_id(request: Request, state: State) -> str:
    return state.keys.identify(request.headers.get("authorization"), _local(request), "feedback")


KeyId = Annotated[str, Depends(_key_id)]
"""The caller's API key id, which must have the ``chat`` scope."""
FeedbackKeyId = Annotated[str, Depends(_feedback_key_id)]
"""The caller's API key id, which must have the ``feedback`` scope."""


async def _admin(request: Request, state: State) -> None:
    state.admin.check(request.headers.get("authorization"), _local(request))


Admin = Depends(_admin)
