"""Degradation: fewer candidates instead of failing, when the gateway is loaded or the reward model slow.

Knows two signals and one rule for each, and never goes below the ``n`` answers the client
asked for (so down to 1, an unranked answer):
- requests in flight past ``limits.degrade_above``: N scales by ``degrade_above / in_flight``
  (twice the threshold, half the candidates), so the candidates in flight stay about
  ``degrade_above x N``;
- the reward model's pace (seconds of the score stage per candidate, queueing included: a
  time-decayed average of recent requests) past ``scorer.degrade_above_ms`` for the
  request's N: N shrinks to what fits. While N is lowered to 1 nothing is scored, so the
  average decays (``PACE_HALF_LIFE_S``) and N grows again: a recovered reward model is
  found by trying, a still-slow one lowers N again at once.
Does not count or tag; the service does.
"""

from __future__ import annotations

import math
import time

PACE_HALF_LIFE_S = 10.0
"""How fast a remembered pace fades when nothing is scored."""
PACE_WEIGHT = 0.3
"""The weight of each new request's pace in the average."""


class ScorerPace:
    """The reward model's recent seconds per candidate: an exponential average whose memory also fades with time."""

    def __init__(self, half_life_s: float = PACE_HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self._per_candidate_s = 0.0
        self._at = 0.0

    def per_candidate_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        fade: float = 0.5 ** (max(0.0, now - self._at) / self.half_life_s)
        return self._per_candidate_s * fade

    def observe(self, seconds: float, candidates: int, now: float | None = None) -> None:
        """One request's score stage took ``seconds`` for ``candidates`` answers (a missed deadline counts as its length)."""
        now = time.monotonic() if now is None else now
        pace, remembered = seconds / max(1, candidates), self.per_candidate_s(now)
        self._per_candidate_s = pace if remembered == 0.0 else (1 - PACE_WEIGHT) * remembered + PACE_WEIGHT * pace
        self._at = now


def under_load(n: int, n_return: int, in_flight: int, degrade_above: int) -> int:
    """N for a request arriving with ``in_flight`` requests running (itself included); ``degrade_above`` 0: never lower."""
    if not degrade_above or in_flight <= degrade_above:
        return n
    return max(n_return, min(n, math.floor(n * degrade_above / in_flight)))


def within_pace(n: int, n_return: int, per_candidate_s: float, budget_ms: float | None) -> int:
    """The most candidates the reward model scores within ``budget_ms`` at its recent pace; None: never lower."""
    if budget_ms is None or per_candidate_s * n * 1000 <= budget_ms:
        return n
    return max(n_return, min(n, math.floor(budget_ms / (per_candidate_s * 1000))))
