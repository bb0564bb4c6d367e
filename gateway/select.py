"""Selection: rank candidates by reward and keep the best ``n``.

Knows the ranking rule (highest reward first; ties keep generation order, so a run is
repeatable). Does not know where rewards come from.
"""

from __future__ import annotations

from collections.abc import Sequence


def rank(rewards: Sequence[float]) -> list[int]:
    """Candidate indices, best first."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))


def select(rewards: Sequence[float], n: int) -> list[int]:
    """The indices of the ``n`` best candidates, best first."""
    if n < 1 or n > len(rewards):
        raise ValueError(f"cannot select {n} of {len(rewards)} candidates")
    return rank(rewards)[:n]
