"""The canary gate's decisions judged after the fact against gold: what each arm served during a trial.

Reads a run's log (the answers the simulated user got while a version was on trial, each
with the version that wrote it), scores every served answer with the hidden gold reward
and compares the arms with a Welch 95% interval on the mean gold difference (canary −
current). A decision agrees with gold when that difference is significant and has the
decision's sign (promote: the canary was better; rollback: worse); when gold does not
differ significantly, there is nothing to agree with. Reads the gold reward: evaluation only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gateway.intervals import welch_samples
from toyworld.gold import gold_reward

Z95 = 1.959964


@dataclass(frozen=True)
class Judged:
    canary_answers: int
    current_answers: int
    gold_diff: tuple[float, float, float]
    """Canary minus current mean gold of the served answers: estimate, low, high (95%)."""
    significant: bool
    agrees: bool | None
    """Whether the gate's action has the sign of a significant gold difference; None: gold did not differ."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gold_diff": [round(x, 4) for x in self.gold_diff]}


def judge(action: str, canary: Sequence[float], current: Sequence[float]) -> Judged | None:
    """The gate's ``action`` against the arms' gold; None when an arm has fewer than two answers."""
    if min(len(canary), len(current)) < 2:
        return None
    diff = welch_samples(canary, current, Z95)
    significant = diff.low > 0 or diff.high < 0
    agrees = None
    if significant and action in ("promote", "rollback"):
        agrees = (action == "promote") == (diff.estimate > 0)
    return Judged(len(canary), len(current), (diff.estimate, diff.low, diff.high), significant, agrees)


def served_gold(database_url: str, versions: Sequence[str], since: float, until: float) -> dict[str, list[float]]:
    """Per version, the gold of each answer it served (the chosen candidate) in [since, until]."""
    from gateway.store.sql import SqlStore

    store = SqlStore(database_url)
    out: dict[str, list[float]] = {v: [] for v in versions}
    try:
        for record, _ in store.read_labelled(since, until):
            chosen = next((c for c in record.candidates if c.chosen), None)
            if record.status != "ok" or record.policy_version not in out or chosen is None:
                continue
            prompt = str(record.messages[-1]["content"])
            out[record.policy_version].append(gold_reward(prompt, chosen.text))
    finally:
        store.close()
    return out


def agreement(judged: Sequence[Judged]) -> dict[str, Any]:
    """Over trials: how many, how many differed significantly in gold, and the share of those the gate got right."""
    decided = [j for j in judged if j.agrees is not None]
    right = sum(1 for j in decided if j.agrees)
    return {
        "trials": len(judged),
        "significant": len(decided),
        "agree": right,
        "share": round(right / len(decided), 4) if decided else None,
        "rule": "the gate's decision has the sign of the canary-minus-current gold difference of the answers each arm "
        "served during the trial, counted over trials where that difference's 95% Welch interval excludes 0",
    }
