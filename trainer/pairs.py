"""Preference pairs from the gateway's log, in TRL's formats.

Knows how one logged completion (its scored candidates, and its owner's thumb if any)
becomes DPO pairs (TRL's conversational ``prompt``/``chosen``/``rejected``) or, for a
thumb with nothing to pair against, an unpaired KTO example (``prompt``/``completion``/
``label``), plus metadata columns (rewards, margin, versions, completion id, thumb, the
sampled token ids). Pure functions over records; reading the store and writing files is
``trainer.export``.

Rules:
- Candidates with the same text count once (N samples often repeat each other).
- No thumb: ``best_vs_worst`` pairs the highest reward with the lowest, ``best_vs_each``
  pairs it with every other; a pair needs a reward gap above 0 and at least ``min_margin``.
  Rewards are only compared within one completion, so within one reward-model version.
- A thumb overrides the reward model (when ``thumbs_override``): the served answer
  thumbed down becomes ``rejected`` against the best other candidate; thumbed up, it
  becomes ``chosen`` against the others by the pair policy. ``min_margin`` is waived.
- A thumb on a completion with a single distinct answer is exported unpaired for KTO.
- ``from_reward_model`` off: only thumbed completions make pairs (the reward model still
  ranks the side the thumb did not judge).
- The same (prompt, chosen, rejected) from several completions is kept once; training may then
  repeat the thumb-decided ones (``weighted``, by ``thumb_weight`` and each row's ``weight``).
- ``max_thumbs_per_key``: past that many thumbed completions from one API key in the window, that
  key's further thumbs are ignored (the completion counts as unthumbed): one key cannot steer a round.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.store.records import CandidateRecord, CompletionRecord, FeedbackRecord
from trainer.history import repeats
from trainer.settings import PairSettings


@dataclass
class PairStats:
    completions: int = 0
    pairs: int = 0
    unpaired: int = 0
    from_thumbs: int = 0
    unscored: int = 0
    """Completions without rewards (and without a thumb): nothing to rank them by."""
    below_margin: int = 0
    """Candidate pairs dropped for a reward gap of 0 or under ``min_margin``."""
    duplicates: int = 0
    """Pairs or unpaired examples already exported from another completion."""
    unthumbed: int = 0
    """Completions without a thumb, left out because ``from_reward_model`` is off."""
    capped_thumbs: int = 0
    """Thumbs ignored because their key had already decided ``max_thumbs_per_key`` completions."""


@dataclass
class Exported:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    unpaired: list[dict[str, Any]] = field(default_factory=list)
    stats: PairStats = field(default_factory=PairStats)


def build(labelled: Iterable[tuple[CompletionRecord, FeedbackRecord | None]], settings: PairSettings) -> Exported:
    out = Exported()
    seen: set[str] = set()
    thumbs_by_key: dict[str, int] = {}
    for record, thumb in labelled:
        out.stats.completions += 1
        if thumb is not None and not settings.thumbs_override:
            thumb = None
        if thumb is not None and settings.max_thumbs_per_key is not None:
            used = thumbs_by_key.get(thumb.key_id, 0)
            if used >= settings.max_thumbs_per_key:
                thumb = None
                out.stats.capped_thumbs += 1
            else:
                thumbs_by_key[thumb.key_id] = used + 1
        rows, unpaired = _one(record, thumb, settings, out.stats)
        for row in rows:
            if _first(seen, "pair", row["prompt"], row["chosen"], row["rejected"]):
                out.pairs.append(row)
            else:
                out.stats.duplicates += 1
        if unpaired is not None:
            if _first(seen, "kto", unpaired["prompt"], unpaired["completion"], unpaired["label"]):
                out.unpaired.append(unpaired)
            else:
                out.stats.duplicates += 1
    out.stats.pairs, out.stats.unpaired = len(out.pairs), len(out.unpaired)
    out.stats.from_thumbs = sum(1 for p in out.pairs if p["source"] == "thumb")
    return out


def _first(seen: set[str], *key: Any) -> bool:
    digest = json.dumps(key, sort_keys=True, ensure_ascii=False)
    if digest in seen:
        return False
    seen.add(digest)
    return True


def _distinct(candidates: list[CandidateRecord]) -> list[CandidateRecord]:
    """One candidate per text; a repeat of the served answer keeps the served flag."""
    by_text: dict[str, CandidateRecord] = {}
    for c in candidates:
        kept = by_text.get(c.text)
        if kept is None or (c.chosen and not kept.chosen):
            by_text[c.text] = c
    return list(by_text.values())


def _one(
    record: CompletionRecord, thumb: FeedbackRecord | None, settings: PairSettings, stats: PairStats
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    cands = _distinct(record.whole)  # a pruned candidate's partial answer is not compared with whole ones
    scored = all(c.reward is not None for c in cands)
    served = next((c for c in cands if c.chosen), None)
    if thumb is not None and served is not None:
        others = [c for c in cands if c is not served]
        if not others:
            return [], _unpaired(record, served, thumb)
        ranked = sorted(others, key=_reward, reverse=True)  # best other first (unscored: served order)
        if thumb.thumb == "down":
            return [_pair(record, ranked[0], served, thumb)], None
        rejected = ranked if settings.policy == "best_vs_each" else ranked[-1:]
        return [_pair(record, served, r, thumb) for r in rejected], None
    if not settings.from_reward_model:
        stats.unthumbed += 1
        return [], None
    if not scored:
        stats.unscored += 1
        return [], None
    ranked = sorted(cands, key=_reward, reverse=True)
    best, rest = ranked[0], ranked[1:]
    rejected = rest if settings.policy == "best_vs_each" else rest[-1:]
    pairs = []
    for r in rejected:
        margin = _reward(best) - _reward(r)
        if margin > 0 and margin >= settings.min_margin:
            pairs.append(_pair(record, best, r, None))
        else:
            stats.below_margin += 1
    return pairs, None


def _reward(c: CandidateRecord) -> float:
    return c.reward if c.reward is not None else float("-inf")


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def prompt_of(record: CompletionRecord) -> list[dict[str, str]]:
    """The request's messages as plain role/content dicts (what a pair's ``prompt`` holds)."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in record.messages]


def _pair(
    record: CompletionRecord, chosen: CandidateRecord, rejected: CandidateRecord, thumb: FeedbackRecord | None
) -> dict[str, Any]:
    margin = chosen.reward - rejected.reward if chosen.reward is not None and rejected.reward is not None else None
    return {
        "prompt": prompt_of(record),
        "chosen": assistant(chosen.text),
        "rejected": assistant(rejected.text),
        "chosen_reward": chosen.reward,
        "rejected_reward": rejected.reward,
        "margin": margin,
        "source": "thumb" if thumb is not None else "reward_model",
        "thumb": thumb.thumb if thumb is not None else None,
        "completion_id": record.id,
        "policy_version": record.policy_version,
        "rm_version": record.rm_version,
        "chosen_token_ids": chosen.token_ids,
        "rejected_token_ids": rejected.token_ids,
    }


def _unpaired(record: CompletionRecord, answer: CandidateRecord, thumb: FeedbackRecord) -> dict[str, Any]:
    return {
        "prompt": prompt_of(record),
        "completion": assistant(answer.text),
        "label": thumb.thumb == "up",
        "reward": answer.reward,
        "thumb": thumb.thumb,
        "completion_id": record.id,
        "policy_version": record.policy_version,
        "rm_version": record.rm_version,
        "token_ids": answer.token_ids,
    }


def weighted(pairs: list[dict[str, Any]], thumb_weight: int) -> list[dict[str, Any]]:
    """The pairs with each thumb-decided one repeated ``thumb_weight`` × its ``weight`` times (1 unless
    ``trainer.history`` gave it less; a fraction is drawn once per completion), as DPO's rows have no weight of their own."""
    out: list[dict[str, Any]] = []
    for row in pairs:
        weight = float(row.get("weight", 1.0)) * (thumb_weight if row["source"] == "thumb" else 1)
        out.extend([row] * repeats(weight, str(row["completion_id"])))
    return out


def thumbed(labelled: Iterable[tuple[CompletionRecord, FeedbackRecord | None]]) -> list[dict[str, Any]]:
    """Every thumbed answer that was served, unpaired (KTO's rows), whatever else it could be paired with."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record, thumb in labelled:
        served = next((c for c in record.candidates if c.chosen), None)
        if thumb is None or served is None:
            continue
        row = _unpaired(record, served, thumb)
        if _first(seen, "kto", row["prompt"], row["completion"], row["label"]):
            out.append(row)
    return out
