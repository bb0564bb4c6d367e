"""A run of the evaluate-loop on disk: ``<run dir>/run.json``, written after the start and after every round.

Knows how a ``Run`` (its measurements with their per-prompt figures, each round's traffic,
gate, refit and watch) becomes JSON and comes back, so a report can be rebuilt from runs of
several invocations (``python -m toyworld loop-report``: seeds run in different sessions,
or what a stopped invocation had finished). Does not measure or judge.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toyworld.evaluate import Estimate
from toyworld.loop.measure import Measurement
from toyworld.loop.report import RoundRecord, Run
from toyworld.loop.user import Traffic

FILE = "run.json"


def save(run: Run, run_dir: Path) -> None:
    """Replace ``run_dir``'s record atomically (a reader never sees half of it)."""
    path = run_dir / FILE
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(asdict(run)))
    partial.replace(path)


def load(run_dir: Path) -> Run:
    data = json.loads((run_dir / FILE).read_text())
    rounds = [_round(r) for r in data["rounds"]]
    return Run(data["arm"], int(data["seed"]), float(data["thumb_rate"]), _measurement(data["start"]), rounds)


def _estimate(data: dict[str, Any] | None) -> Estimate | None:
    if data is None:
        return None
    low, high = data["ci95"]
    return Estimate(float(data["mean"]), (float(low), float(high)), int(data["n"]))


def _measurement(data: dict[str, Any]) -> Measurement:
    n1 = _estimate(data["n1_gold"])
    assert n1 is not None
    return Measurement(
        **{**data, "n1_gold": n1, "rm_accuracy": _estimate(data.get("rm_accuracy")),
           "bon_gold": {int(n): v for n, v in data["bon_gold"].items()},
           "per_prompt_bon": {int(n): v for n, v in data["per_prompt_bon"].items()}},
    )  # fmt: skip


def _round(data: dict[str, Any]) -> RoundRecord:
    return RoundRecord(**{**data, "measurement": _measurement(data["measurement"]), "traffic": Traffic(**data["traffic"])})
