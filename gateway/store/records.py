"""What the gateway records: one completion with all its candidates, and one user thumb.

Plain dataclasses with a JSON form (the spool's line format). Knows nothing about
databases or queues. Times are UTC epoch seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PRUNED = "pruned"
"""The ``finish_reason`` of a candidate aborted while decoding (``selection: prune``): its text is partial and its
reward is the partial answer's, so it is not compared with whole answers."""


@dataclass
class CandidateRecord:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    reward: float | None = None
    scores: dict[str, float] | None = None
    """Per-objective scores, when the reward model gives several."""
    logprob_sum: float | None = None
    logprob_mean: float | None = None
    chosen: bool = False
    tokens: int | None = None
    """Tokens generated when ``token_ids`` no longer holds them (dropped with text redaction); None: len(token_ids)."""

    @property
    def token_count(self) -> int:
        return self.tokens if self.tokens is not None else len(self.token_ids)


@dataclass
class CompletionRecord:
    """One served chat completion; ``id`` is the completion id the client got."""

    id: str
    created: float
    key_id: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    """The sampling fields vLLM received (temperature, max_tokens, seed, ...)."""
    policy_version: str
    rm_version: str | None
    n_candidates: int
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]
    candidates: list[CandidateRecord] = field(default_factory=list)
    status: Literal["ok", "cancelled"] = "ok"
    """``cancelled``: not completed, the client left or its stream broke off (what was generated so far, if anything)."""
    kind: Literal["completion"] = "completion"

    @property
    def whole(self) -> list[CandidateRecord]:
        """The candidates generated to their end (all but those pruned while decoding)."""
        return [c for c in self.candidates if c.finish_reason != PRUNED]


@dataclass
class FeedbackRecord:
    """A thumb on a completion; a repeat from its owner replaces the previous one."""

    completion_id: str
    key_id: str
    thumb: Literal["up", "down"]
    comment: str | None
    created: float
    kind: Literal["feedback"] = "feedback"


Record = CompletionRecord | FeedbackRecord


def to_json(record: Record) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))


def from_json(line: str) -> Record:
    data = json.loads(line)
    kind = data.get("kind")
    if kind == "completion":
        candidates = [CandidateRecord(**c) for c in data.pop("candidates")]
        return CompletionRecord(**data, candidates=candidates)
    if kind == "feedback":
        return FeedbackRecord(**data)
    raise ValueError(f"unknown record kind {kind!r}")
