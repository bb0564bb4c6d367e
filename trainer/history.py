"""Thumbs that accumulate: which thumbed completions of earlier policy versions a round reads, and how much each counts.

A round trains on what the current version served (the reward model's pairs are only
comparable within one version's window). Thumbs are people's judgements of answers, valid
whichever version wrote them, and few: with ``trainer.history.versions: K`` a round
also reads the thumbed completions of the K versions before the current one (and of any
newer one, a canary that was refused), within their own staleness bound, each counting
``decay ** age`` where age is how many versions separate it from the current one. Versions
are the registry's ``v0001``, ``v0002``, ... (the base policy's label is version 0), so the
age of a label that is neither is unknown and its thumbs are not read.

DPO rows have no weight of their own: a pair counts by repetition, the fractional part
drawn once per completion from a hash of its id (the same rows on every run and rank).
Knows nothing about the store, the registry's files or training.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.store.records import CompletionRecord, FeedbackRecord

_VERSION = re.compile(r"^v(\d+)$")
Labelled = tuple[CompletionRecord, FeedbackRecord | None]


def number(label: str, base_label: str) -> int | None:
    """The version's place in the registry's sequence: 0 for the base policy, N for ``vN``; None: not a version label."""
    if label == base_label:
        return 0
    match = _VERSION.match(label)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Window:
    """The round's data window: the current version's completions since ``since``, and with ``versions`` > 0 the
    thumbed completions of up to that many earlier versions since ``thumbs_since``."""

    current: str
    base: str
    since: float
    versions: int = 0
    thumbs_since: float = 0.0
    decay: float = 1.0

    def age(self, label: str) -> int | None:
        """Versions between ``label`` and the current one (0: current, or newer); None: unknown."""
        if label == self.current:
            return 0
        here, there = number(self.current, self.base), number(label, self.base)
        return None if here is None or there is None else max(0, here - there)

    def keeps(self, record: CompletionRecord, thumb: FeedbackRecord | None) -> bool:
        if record.policy_version == self.current:
            return record.created >= self.since
        if thumb is None or self.versions == 0 or record.created < self.thumbs_since:
            return False
        age = self.age(record.policy_version)
        return age is not None and age <= self.versions

    def select(self, labelled: Iterable[Labelled]) -> list[Labelled]:
        return [(record, thumb) for record, thumb in labelled if self.keeps(record, thumb)]

    def weight(self, policy_version: str) -> float:
        """What one thumb served by ``policy_version`` counts: ``decay ** age``."""
        age = self.age(policy_version)
        return 0.0 if age is None else self.decay**age


def thumbs_by_version(labelled: Iterable[Labelled]) -> dict[str, int]:
    """Thumbed completions per policy version (what a round's report shows it read)."""
    counts: dict[str, int] = {}
    for record, thumb in labelled:
        if thumb is not None:
            counts[record.policy_version] = counts.get(record.policy_version, 0) + 1
    return counts


def repeats(weight: float, key: str) -> int:
    """``weight`` as a whole number of rows: its floor, plus one with probability its fractional part, drawn from a
    hash of ``key`` (stable across runs and processes, unlike ``hash``)."""
    whole = math.floor(weight)
    fraction = weight - whole
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return whole + (1 if draw < fraction else 0)


def weigh(rows: list[dict[str, Any]], window: Window) -> list[dict[str, Any]]:
    """Each thumb-decided row with its ``weight`` (``decay ** age`` of the version that served it); others weigh 1."""
    return [{**row, "weight": window.weight(row["policy_version"]) if row.get("thumb") else 1.0} for row in rows]
