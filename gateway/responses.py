"""OpenAI response bodies and stream chunks for a served outcome, and their server-sent-event framing.

Knows the ``chat.completion`` and ``chat.completion.chunk`` shapes (validated against the
official ``openai`` types in the tests), the usage of every generated candidate, and the
``return_candidates`` extension. Does not generate, score or log (``gateway.service``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import orjson
from starlette.responses import JSONResponse

from gateway.errors import GatewayError
from gateway.generate import Generation
from gateway.prune import Leader
from gateway.service import Outcome, Plan


class JsonResponse(JSONResponse):
    """JSON rendered by orjson (measured: the standard library's encoder was a few % of the CPU per request)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def envelope(plan: Plan, obj: str, model_alias: str) -> dict[str, Any]:
    return {
        "id": plan.completion_id,
        "object": obj,
        "created": int(plan.created),
        "model": model_alias,
        "system_fingerprint": plan.policy_version,
    }


def usage(generation: Generation) -> dict[str, int]:
    """Every candidate's tokens: the client's N candidates were all generated for it."""
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def completion(plan: Plan, outcome: Outcome, model_alias: str) -> dict[str, Any]:
    """The ``chat.completion`` body: the selected answers, best first."""
    generated = outcome.generation.candidates
    body = envelope(plan, "chat.completion", model_alias)
    body["choices"] = [
        {
            "index": rank,
            "message": {"role": "assistant", "content": generated[i].text, **generated[i].message},
            "logprobs": generated[i].logprobs if plan.request.logprobs else None,
            "finish_reason": generated[i].finish_reason,
        }
        for rank, i in enumerate(outcome.chosen)
    ]
    body["usage"] = usage(outcome.generation)
    if plan.request.return_candidates:
        body["candidates"] = candidates(outcome)
        degraded = ",".join(filter(None, (plan.degraded, outcome.degraded)))
        if degraded:
            body["degraded"] = degraded  # fewer candidates (overload), or none ranked (the reward model failed)
    return body


def candidates(outcome: Outcome) -> list[dict[str, Any]]:
    """The ``return_candidates`` extension: every candidate, in generation order."""
    return [
        {
            "index": c.index,
            "text": c.text,
            "reward": outcome.rewards[k] if outcome.rewards is not None else None,
            **({"scores": outcome.scores[k]} if outcome.scores is not None else {}),
            "finish_reason": c.finish_reason,
            "chosen": k in outcome.chosen,
        }
        for k, c in enumerate(outcome.generation.candidates)
    ]


def chunks(plan: Plan, outcome: Outcome, model_alias: str) -> list[bytes]:
    """The selected answers as OpenAI stream chunks (after generation and scoring), ``[DONE]`` last."""
    generated = outcome.generation.candidates
    usage_field = {"usage": None} if plan.include_usage else {}
    events: list[dict[str, Any]] = []
    for rank, i in enumerate(outcome.chosen):
        c = generated[i]
        logprobs = c.logprobs if plan.request.logprobs else None
        deltas: list[tuple[dict[str, Any], Any, str | None]] = [
            ({"role": "assistant", "content": ""}, None, None),
            ({"content": c.text}, logprobs, None),
            ({}, None, c.finish_reason),
        ]
        for delta, lp, finish in deltas:
            choice = {"index": rank, "delta": delta, "logprobs": lp, "finish_reason": finish}
            events.append({**envelope(plan, "chat.completion.chunk", model_alias), "choices": [choice], **usage_field})
    if plan.request.return_candidates:
        events[-1]["candidates"] = candidates(outcome)
    if plan.include_usage:
        events.append({**envelope(plan, "chat.completion.chunk", model_alias), "choices": [], "usage": usage(outcome.generation)})
    return [orjson.dumps(e) for e in events] + [b"[DONE]"]


async def led(plan: Plan, run: asyncio.Future[Outcome], leader: Leader, model_alias: str) -> AsyncGenerator[bytes, None]:
    """A streamed pruned best-of-N (``gateway.prune.Leader``): the leader's text as it decodes, once pruning has left
    it alone; when no candidate was left alone (one finished first), the chosen answer after selection, as
    ``chunks``. ``run`` is the service's run of the request (cancelled if the stream is let go early). A failure
    after the first chunk ends the stream with an error event."""
    try:
        piece = await leader.pieces.get()
        if piece is None:
            for chunk in chunks(plan, await run, model_alias):
                yield chunk
            return
        head = envelope(plan, "chat.completion.chunk", model_alias)
        usage_field = {"usage": None} if plan.include_usage else {}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return orjson.dumps({**head, "choices": [choice], **usage_field})

        yield event({"role": "assistant", "content": piece})
        while (piece := await leader.pieces.get()) is not None:
            yield event({"content": piece})
        try:
            outcome = await run
        except GatewayError as exc:
            yield orjson.dumps(exc.body())
            yield b"[DONE]"
            return
        answer = outcome.generation.candidates[outcome.chosen[0]]
        last = {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}],
                **usage_field}  # fmt: skip
        if plan.request.return_candidates:
            last["candidates"] = candidates(outcome)
        yield orjson.dumps(last)
        if plan.include_usage:
            yield orjson.dumps({**head, "choices": [], "usage": usage(outcome.generation)})
        yield b"[DONE]"
    finally:
        if not run.done():
            run.cancel()


async def sse(head: Iterable[bytes], tail: AsyncIterator[bytes] | None = None) -> AsyncIterator[bytes]:
    """Server-sent events: each payload as one ``data:`` event, ``head`` first, then ``tail`` as it comes."""
    for payload in head:
        yield b"data: " + payload + b"\n\n"
    if tail is not None:
        async for payload in tail:
            yield b"data: " + payload + b"\n\n"
