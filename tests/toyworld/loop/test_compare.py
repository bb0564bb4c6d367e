"""Runs compared on what their traffic was served (``toyworld.loop.compare``): constructed logs of two runs of one
prompt stream, paired per prompt and its asking, split into rounds by the answers each round recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store.records import CandidateRecord, CompletionRecord
from gateway.store.sql import SqlStore
from tests.toyworld.loop.test_report import measurement
from toyworld.__main__ import main
from toyworld.gold import gold_reward
from toyworld.loop import records
from toyworld.loop.compare import compare, served
from toyworld.loop.report import RoundRecord, Run
from toyworld.loop.user import Traffic

COUNT, CAPITAL = "How many things did I list here: rope, shell, key, coin, chair?", "Tell me the capital of Bripelland."
RIGHT, WRONG = "It is 5.", "It is 7."


def _run(run_dir: Path, answers: list[tuple[str, str, int]], per_round: list[int]) -> None:
    """A run whose log holds ``answers`` (prompt, chosen text, N) in this order and whose rounds answered ``per_round``."""
    (run_dir / "data").mkdir(parents=True)
    store = SqlStore(f"sqlite:///{run_dir / 'data' / 'gateway.db'}")
    store.migrate()
    store.write([
        CompletionRecord(f"c{i}", 1000.0 + i, "k", [{"role": "user", "content": prompt}], {}, "base", "rm", n, 1, 1, {},
                         [CandidateRecord(0, text, [1], "stop", 1.0, chosen=True)])
        for i, (prompt, text, n) in enumerate(answers)
    ])  # fmt: skip
    store.close()
    start = measurement([0.5])
    rounds = [RoundRecord(k + 1, start, "base", 0, "trained", Traffic(sent=sent)) for k, sent in enumerate(per_round)]
    records.save(Run("rm", 0, 0.0, start, rounds), run_dir)


def test_requests_pair_by_prompt_and_asking_within_a_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # round 1: COUNT, CAPITAL; round 2: COUNT again (its second asking); the fixed run at N=4, the other at 2 then 1
    _run(tmp_path / "fixed", [(COUNT, RIGHT, 4), (CAPITAL, WRONG, 4), (COUNT, WRONG, 4)], [2, 1])
    _run(tmp_path / "adaptive", [(CAPITAL, WRONG, 2), (COUNT, WRONG, 2), (COUNT, RIGHT, 1)], [2, 1])
    fixed, adaptive = served(tmp_path / "fixed"), served(tmp_path / "adaptive")
    assert fixed[COUNT, 1].round == 2
    assert (adaptive[COUNT, 0].candidates, adaptive[COUNT, 1].candidates) == (2, 1)
    right, wrong = gold_reward(COUNT, RIGHT), gold_reward(COUNT, WRONG)
    assert right > wrong
    first, second = compare(fixed, adaptive)
    assert (first["round"], first["prompts"], first["candidates_ratio"]) == (1, 2, 0.5)
    assert first["gold_diff"] == pytest.approx((wrong - right) / 2, abs=1e-4)  # the count went wrong, the capital the same
    assert (second["round"], second["prompts"], second["candidates_ratio"]) == (2, 1, 0.25)
    assert second["gold_diff"] == pytest.approx(right - wrong, abs=1e-4)
    assert main(["loop-compare", str(tmp_path / "fixed"), str(tmp_path / "adaptive")]) == 0
    assert '"candidates_ratio": 0.25' in capsys.readouterr().out
    assert main(["loop-compare", str(tmp_path / "fixed"), str(tmp_path)]) == 2
    assert "not a run's directory" in capsys.readouterr().err
