"""The OpenAI chat-completions request, with this gateway's extensions in one marked block.

Knows which fields exist (in the order of OpenAI's API reference), which the gateway
handles itself, which pass through to vLLM unchanged, and which best-of-N cannot honour.
Fields this module does not name are vLLM's own (``top_k``, ``min_p``...): those the
deployment allows (``vllm_fields``) pass through and vLLM validates them; any other is
refused by name (``unknown_fields``). Response bodies are built in ``gateway.responses``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined); what the reward model reads."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown fields are kept here; ``unknown_fields`` says which are not allowed."""

    model_config = ConfigDict(extra="allow")

    # --- OpenAI fields, in the API reference's order ---
    messages: list[Message] = Field(min_length=1)
    model: str
    audio: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: float | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    safety_identifier: str | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: str | list[str] | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    # --- Extensions of this gateway (not OpenAI fields) ---
    n_candidates: int | None = Field(default=None, ge=1, description="candidates to generate and rank (best-of-N)")
    return_candidates: bool = Field(default=False, description="add a `candidates` list: every candidate's text and reward")
    selection: Literal["best_of_n", "prune"] | None = Field(
        default=None, description="how N>1 candidates are chosen: all to the end (best_of_n), or the weakest aborted "
        "while they decode (prune); None: the gateway's `selection`",
    )  # fmt: skip
    reward_weights: dict[str, float] | None = Field(
        default=None, description="the reward as sum(weight x score) over objectives: reward_model, length (words), "
        "refusal (1 when the answer refuses), judge (an LLM judge's P(yes)); None: the gateway's objectives.weights",
    )  # fmt: skip
    latency_budget_ms: float | None = Field(
        default=None, gt=0, description="N is lowered to the most candidates the gateway predicts to answer within this "
        "(from recent requests' latency at their N: the load shows in it); None: the gateway's adaptive.latency_budget_ms",
    )  # fmt: skip
    deadline_ms: int | None = Field(
        default=None, ge=1, description="the most this request may take, generation and scoring together (at most the "
        "gateway's timeouts.deadline_s): 504 `deadline_exceeded` past it while generating; scoring gets what is left",
    )  # fmt: skip

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``. Unknown fields are refused: a client never sets rewards, choices or owners."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=96)
    thumb: Literal["up", "down"]
    comment: str | None = None


class AdminAction(BaseModel):
    """``POST /admin/policy/promote|rollback`` and ``/admin/watch/clear`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


GATEWAY_FIELDS = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "store",
        "metadata",
        "n_candidates",
        "return_candidates",
        "deadline_ms",
        "selection",
        "latency_budget_ms",
        "reward_weights",
    }
)
"""Handled by the gateway itself; never forwarded as they are."""

TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call", "parallel_tool_calls")
"""Best-of-N ranks text answers; a tool call is not one, so these need N=1."""


def uses_tools(request: ChatCompletionRequest) -> str | None:
    """The first tool field that asks for tool use, or None."""
    for name in TOOL_FIELDS:
        value = getattr(request, name)
        if value is None or (name in ("tool_choice", "function_call") and value == "none"):
            continue
        if name == "parallel_tool_calls":
            continue  # only a modifier of `tools`
        return name
    return None


def unknown_fields(request: ChatCompletionRequest, allowed: Collection[str]) -> list[str]:
    """Fields the request set that are neither OpenAI's, the gateway's, nor allowed vLLM fields."""
    return [name for name in request.model_extra or {} if name not in allowed]


def passthrough(request: ChatCompletionRequest) -> dict[str, Any]:
    """The fields vLLM receives unchanged: everything the client set that the gateway does not own."""
    # model_dump includes the extra (vLLM-only) fields too
    data: dict[str, Any] = request.model_dump(exclude_unset=True, exclude_none=True, exclude=set(GATEWAY_FIELDS))
    return data
