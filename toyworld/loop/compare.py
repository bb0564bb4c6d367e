"""Runs of one seed compared on what their traffic was served, paired per prompt (``python -m toyworld loop-compare``).

Every run of a seed asks the same stream of training prompts (``loop.runner``: the seed's shuffle, cycled), so the
k-th asking of a prompt is the same request in each run. From each run's log (every answered completion, in the order
it was created: its chosen answer and its N) and its ``run.json`` (the answers of each round), this gives per round the
prompts both runs answered, the candidates one generated against the other, each run's mean gold of the answers and the
paired difference with its 95% interval. What it is for: a serving change (adaptive N, a price per candidate) against a
fixed N over the same requests, where each run's rounds alone compare only unpaired. Reads the gold reward: evaluation
only. Does not sample, train or judge goals.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toyworld.evaluate import mean_ci
from toyworld.gold import gold_reward
from toyworld.loop import records


@dataclass(frozen=True)
class Served:
    round: int
    gold: float
    candidates: int


def served(run_dir: Path) -> dict[tuple[str, int], Served]:
    """Each answered request of the run, keyed by (prompt, how many times it was asked before), with its round (by
    the answers each round recorded), the gold of its answer and its N."""
    from gateway.store.sql import SqlStore

    run = records.load(run_dir)
    ends = list(itertools.accumulate(r.traffic.answered for r in run.rounds))
    store = SqlStore(f"sqlite:///{run_dir / 'data' / 'gateway.db'}")
    out: dict[tuple[str, int], Served] = {}
    asked: dict[str, int] = {}
    try:
        answered = (r for r in store.read_completions() if r.status == "ok")
        for i, record in enumerate(answered):
            chosen = next((c for c in record.candidates if c.chosen), None)
            if chosen is None or i >= (ends[-1] if ends else 0):
                continue
            prompt = str(record.messages[-1]["content"])
            k = asked.get(prompt, 0)
            asked[prompt] = k + 1
            out[prompt, k] = Served(bisect.bisect_right(ends, i) + 1, gold_reward(prompt, chosen.text), record.n_candidates)
    finally:
        store.close()
    return out


def compare(base: dict[tuple[str, int], Served], other: dict[tuple[str, int], Served]) -> list[dict[str, Any]]:
    """Per round: ``other`` against ``base`` on the requests both answered in that round."""
    rounds = []
    for k in sorted({s.round for s in base.values()}):
        keys = [key for key, s in base.items() if s.round == k and key in other and other[key].round == k]
        if not keys:
            continue
        diff = mean_ci([other[key].gold - base[key].gold for key in keys])
        rounds.append({
            "round": k, "prompts": len(keys),
            "candidates_ratio": round(sum(other[key].candidates for key in keys) / sum(base[key].candidates for key in keys), 4),
            "gold": round(sum(other[key].gold for key in keys) / len(keys), 4),
            "base_gold": round(sum(base[key].gold for key in keys) / len(keys), 4),
            "gold_diff": round(diff.mean, 4), "gold_diff_ci95": [round(diff.ci95[0], 4), round(diff.ci95[1], 4)],
        })  # fmt: skip
    return rounds
