"""Served best-of-N requests as RL groups: N samples of one prompt with their rewards and the log-probs vLLM sampled them at.

Knows how one logged completion becomes a group (every candidate is a sample, repeats
included: they are separate draws) and each sample's advantage relative to its group:
``group`` (GRPO: the reward minus the group's mean, over the group's standard deviation) or
``leave_one_out`` (RLOO: the reward minus the mean of the others). A user's thumb on the
served answer is folded into the group's rewards before that: thumbed up, the served
answer's reward becomes one group standard deviation above the best other sample; thumbed
down, one below the worst (the thumb decides, as it does for pairs). A completion is not
a group when it has fewer than two samples, an unscored sample, or a sample without the
sampled token ids or their log-probs (the importance weight needs both). Pure functions
over records; the training is ``trainer.grpo``'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import fmean, pstdev
from typing import Any, Literal

from gateway.store.records import CompletionRecord, FeedbackRecord

Baseline = Literal["group", "leave_one_out"]


@dataclass
class Group:
    completion_id: str
    policy_version: str
    prompt: list[dict[str, Any]]
    answers: list[list[int]]
    """Each sample's token ids as vLLM sampled them."""
    texts: list[str]
    rewards: list[float]
    logprobs: list[float]
    """Each sample's summed log-prob under the version that served it (vLLM's, as logged)."""
    served: int | None
    thumb: Literal["up", "down"] | None = None
    weight: float = 1.0
    """What the group counts (``trainer.history``'s age weight for an earlier version's thumbed group)."""


@dataclass
class GroupStats:
    completions: int = 0
    groups: int = 0
    samples: int = 0
    thumbed: int = 0
    too_small: int = 0
    unscored: int = 0
    no_logprobs: int = 0
    flat: int = 0
    """Groups whose rewards (after the thumb) are all equal: no advantage, nothing to learn."""


@dataclass
class Groups:
    groups: list[Group] = field(default_factory=list)
    stats: GroupStats = field(default_factory=GroupStats)


def build(labelled: Iterable[tuple[CompletionRecord, FeedbackRecord | None]]) -> Groups:
    out = Groups()
    for record, thumb in labelled:
        out.stats.completions += 1
        cands = record.whole  # the group is what was generated to the end (not candidates pruned while decoding)
        if len(cands) < 2:
            out.stats.too_small += 1
            continue
        if any(c.reward is None for c in cands):
            out.stats.unscored += 1
            continue
        if any(c.logprob_sum is None or not c.token_ids for c in cands):
            out.stats.no_logprobs += 1
            continue
        served = next((i for i, c in enumerate(cands) if c.chosen), None)
        verdict = thumb.thumb if thumb is not None and served is not None else None
        prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in record.messages]
        group = Group(
            record.id, record.policy_version, prompt, [list(c.token_ids) for c in cands], [c.text for c in cands],
            [float(c.reward or 0.0) for c in cands], [float(c.logprob_sum or 0.0) for c in cands], served, verdict,
        )  # fmt: skip
        if pstdev(folded(group)) == 0:
            out.stats.flat += 1
            continue
        out.groups.append(group)
        out.stats.groups += 1
        out.stats.samples += len(cands)
        out.stats.thumbed += group.thumb is not None
    return out


def folded(group: Group) -> list[float]:
    """The group's rewards with the thumb folded in (the served answer moved past the best or worst other sample)."""
    rewards = list(group.rewards)
    if group.thumb is None or group.served is None:
        return rewards
    others = [r for i, r in enumerate(rewards) if i != group.served]
    spread = pstdev(rewards) or 1.0
    rewards[group.served] = max(others) + spread if group.thumb == "up" else min(others) - spread
    return rewards


def advantages(group: Group, baseline: Baseline) -> list[float]:
    rewards = folded(group)
    n = len(rewards)
    if baseline == "leave_one_out":
        total = sum(rewards)
        return [r - (total - r) / (n - 1) for r in rewards]
    mean, sd = fmean(rewards), pstdev(rewards)
    return [(r - mean) / sd if sd > 0 else 0.0 for r in rewards]
