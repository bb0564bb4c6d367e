"""Warming up before ``/ready``: one best-of-N request through the route the gateway serves, and one reward-model
pass, so that no user's request pays for vLLM's and the reward model's first passes (measured before this existed:
the first chat request after ``/ready`` took 18 s on the default models).

Knows what a warm-up request is (the configured N, a few tokens, nothing logged or counted as traffic), and retries
it until it works; ``/ready`` answers 503 until then. Not what else readiness needs (``gateway.routes.ready``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.score import Conversation
from gateway.service import ChatService

log = logging.getLogger("gateway.warmup")
PROMPT = [{"role": "user", "content": "Hello! What is 3 plus 4?"}]


async def warm_up(service: ChatService) -> float:
    """One generation of the configured N on the current route, and its rewards; the seconds it took."""
    started = time.perf_counter()
    route = service.route("warm-up") if service.route is not None else None
    n = service.settings.n_candidates if service.scorer is not None else 1
    generation = await service.generator.generate(
        {"messages": PROMPT, "max_tokens": 4}, n, route.models if route is not None else None
    )
    if service.scorer is not None:
        await service.scorer.score([Conversation(PROMPT, c.text) for c in generation.candidates])
    return time.perf_counter() - started


async def until_warm(service: ChatService, on_warm: Callable[[], None], retry_s: float = 2.0) -> None:
    """``warm_up`` until it works, then ``on_warm()``; failures (vLLM still starting) are logged and retried."""
    while True:
        try:
            seconds = await warm_up(service)
        except Exception as exc:  # whatever it is (vLLM starting, a bad answer), /ready must not wait silently forever
            log.warning("warm-up failed (%s: %s); retrying in %.0f s", exc.__class__.__name__, exc, retry_s)
            await asyncio.sleep(retry_s)
            continue
        log.info("warmed up in %.2f s", seconds)
        on_warm()
        return
