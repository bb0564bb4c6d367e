"""One chat completion, start to end: protocol → generate → score → select → response.

Knows the request's plan (how many candidates to generate and return, the token budget,
what best-of-N cannot honour), runs the stages in order with their timings, and builds
OpenAI response bodies and stream chunks. Routes call it; it never sees HTTP.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import InvalidRequest, ModelNotFound
from gateway.generate import Generation, Generator
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest, passthrough, uses_tools
from gateway.score import Conversation, Scorer
from gateway.select import select
from gateway.settings import GatewaySettings


@dataclass
class Plan:
    """What the gateway will do for one validated request."""

    request: ChatCompletionRequest
    n_candidates: int
    n_return: int
    max_tokens: int
    body: dict[str, Any]
    """The fields vLLM receives (without model, n and streaming, which the generator sets)."""
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{os.urandom(16).hex()}")
    created: int = field(default_factory=lambda: int(time.time()))
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return bool(self.request.stream)

    @property
    def include_usage(self) -> bool:
        options = self.request.stream_options
        return bool(options and options.include_usage)


@dataclass
class Outcome:
    generation: Generation
    rewards: list[float] | None
    chosen: list[int]


class ChatService:
    def __init__(self, settings: GatewaySettings, generator: Generator, scorer: Scorer | None, metrics: Metrics) -> None:
        self.settings = settings
        self.generator = generator
        self.scorer = scorer
        self.metrics = metrics

    # ---- protocol: validate and plan ----
    def plan(self, request: ChatCompletionRequest) -> Plan:
        s = self.settings
        if request.model != s.model_alias:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist; this gateway serves '{s.model_alias}'", param="model"
            )
        if request.audio is not None or (request.modalities and "audio" in request.modalities):
            raise InvalidRequest("audio output is not supported: the model is text-only", param="modalities")
        if request.web_search_options is not None:
            raise InvalidRequest("web search is not supported by this gateway", param="web_search_options")
        max_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens or request.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise InvalidRequest(
                f"{max_param} {max_tokens} exceeds this gateway's limit of {s.max_tokens_limit}", param=max_param
            )
        n_return = request.n or 1
        default_n = s.n_candidates if s.scoring_enabled else 1
        n_candidates = max(request.n_candidates or default_n, n_return)
        param = "n_candidates" if request.n_candidates is not None and request.n_candidates >= n_return else "n"
        if n_candidates > s.max_n_candidates:
            raise InvalidRequest(f"{param} {n_candidates} exceeds the maximum of {s.max_n_candidates} candidates", param=param)
        if n_candidates > 1 and not s.scoring_enabled:
            raise InvalidRequest("scoring is disabled on this gateway, so it generates one candidate (n=1)", param=param)
        tool_field = uses_tools(request)
        if tool_field and n_candidates > 1:
            raise InvalidRequest(
                f"'{tool_field}' cannot be used with best-of-N: set n_candidates to 1 to call tools", param=tool_field
            )
        body = passthrough(request)
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
        return Plan(request, n_candidates, n_return, max_tokens, body)

    # ---- generate → score → select ----
    async def run(self, plan: Plan) -> Outcome:
        started = time.perf_counter()
        generation = await self.generator.generate(plan.body, plan.n_candidates)
        plan.timings["generate"] = time.perf_counter() - started
        self.metrics.stage_latency.labels("generate").observe(plan.timings["generate"])
        self.metrics.candidates.observe(len(generation.candidates))

        rewards: list[float] | None = None
        if self.scorer is not None and (len(generation.candidates) > 1 or plan.request.return_candidates):
            started = time.perf_counter()
            messages = [{"role": m.role, "content": m.text()} for m in plan.request.messages]
            rewards = await self.scorer.score([Conversation(messages, c.text) for c in generation.candidates])
            plan.timings["score"] = time.perf_counter() - started
            self.metrics.stage_latency.labels("score").observe(plan.timings["score"])

        started = time.perf_counter()
        chosen = select(rewards, plan.n_return) if rewards is not None else list(range(plan.n_return))
        plan.timings["select"] = time.perf_counter() - started
        self.metrics.stage_latency.labels("select").observe(plan.timings["select"])
        if rewards is not None:
            self.metrics.chosen_reward.observe(rewards[chosen[0]])
            self.metrics.chosen_reward_total.observe(rewards[chosen[0]])
            if len(rewards) > 1:
                runner_up = max(r for i, r in enumerate(rewards) if i != chosen[0])
                self.metrics.reward_margin.observe(rewards[chosen[0]] - runner_up)
        return Outcome(generation, rewards, chosen)

    # ---- responses ----
    def _envelope(self, plan: Plan, obj: str) -> dict[str, Any]:
        return {
            "id": plan.completion_id,
            "object": obj,
            "created": plan.created,
            "model": self.settings.model_alias,
            "system_fingerprint": self.settings.policy_version,
        }

    def _usage(self, generation: Generation) -> dict[str, int]:
        """Every candidate's tokens: the client's N candidates were all generated for it."""
        return {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }

    def response(self, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        candidates = outcome.generation.candidates
        body = self._envelope(plan, "chat.completion")
        body["choices"] = [
            {
                "index": rank,
                "message": {"role": "assistant", "content": candidates[i].text},
                "logprobs": candidates[i].logprobs if plan.request.logprobs else None,
                "finish_reason": candidates[i].finish_reason,
            }
            for rank, i in enumerate(outcome.chosen)
        ]
        body["usage"] = self._usage(outcome.generation)
        if plan.request.return_candidates:
            body["candidates"] = self._candidates(outcome)
        return body

    def _candidates(self, outcome: Outcome) -> list[dict[str, Any]]:
        """The ``return_candidates`` extension: every candidate, in generation order."""
        return [
            {
                "index": c.index,
                "text": c.text,
                "reward": outcome.rewards[k] if outcome.rewards is not None else None,
                "finish_reason": c.finish_reason,
                "chosen": k in outcome.chosen,
            }
            for k, c in enumerate(outcome.generation.candidates)
        ]

    def chunks(self, plan: Plan, outcome: Outcome) -> list[bytes]:
        """The selected answers as OpenAI stream chunks (after generation and scoring)."""
        candidates = outcome.generation.candidates
        usage_field = {"usage": None} if plan.include_usage else {}
        events: list[dict[str, Any]] = []
        for rank, i in enumerate(outcome.chosen):
            c = candidates[i]
            logprobs = c.logprobs if plan.request.logprobs else None
            deltas: list[tuple[dict[str, Any], Any, str | None]] = [
                ({"role": "assistant", "content": ""}, None, None),
                ({"content": c.text}, logprobs, None),
                ({}, None, c.finish_reason),
            ]
            for delta, lp, finish in deltas:
                choice = {"index": rank, "delta": delta, "logprobs": lp, "finish_reason": finish}
                events.append({**self._envelope(plan, "chat.completion.chunk"), "choices": [choice], **usage_field})
        if plan.request.return_candidates:
            events[-1]["candidates"] = self._candidates(outcome)
        if plan.include_usage:
            events.append(
                {**self._envelope(plan, "chat.completion.chunk"), "choices": [], "usage": self._usage(outcome.generation)}
            )
        return [json.dumps(e, separators=(",", ":")).encode() for e in events] + [b"[DONE]"]

    async def relay(self, plan: Plan) -> AsyncIterator[bytes]:
        """N=1 streaming: vLLM's chunks as they come, with this gateway's id, model and fingerprint."""
        started = time.perf_counter()
        body = dict(plan.body)
        if plan.request.stream_options is not None:
            body["stream_options"] = plan.request.stream_options.model_dump(exclude_none=True)
        stream = self.generator.stream(body)
        first = True
        try:
            async for payload in stream:
                if first:
                    plan.timings["first_token"] = time.perf_counter() - started
                    first = False
                if payload == b"[DONE]":
                    yield payload
                    continue
                chunk = json.loads(payload)
                if "error" not in chunk:
                    chunk.update(
                        id=plan.completion_id, model=self.settings.model_alias, system_fingerprint=self.settings.policy_version
                    )
                yield json.dumps(chunk, separators=(",", ":")).encode()
        finally:
            plan.timings["generate"] = time.perf_counter() - started
            self.metrics.stage_latency.labels("generate").observe(plan.timings["generate"])
            self.metrics.candidates.observe(1)
