"""The evaluate-loop's run config (the loop's own settings, then ``--set`` overrides, per arm when prefixed), and a
run's end on SIGTERM (its ``finally``s run: that is where the gateway it started is stopped)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from toyworld.loop.processes import LoopError, Terminated, run_child, terminable
from toyworld.loop.runner import Loop, LoopOptions


def test_overrides_apply_to_every_arm_or_to_the_one_they_name(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"dpo": {"beta": 0.2}, "pairs": {"policy": "best_vs_worst"}}}))
    overrides = {"trainer.dpo.learning_rate": 1e-3, "thumbs:trainer.pairs.policy": "best_vs_each",
                 "thumbs:trainer.kl_budget.max_nats": 1.0}  # fmt: skip
    loop = Loop(LoopOptions(config=base, overrides=overrides, out=tmp_path / "runs"))
    written = {}
    for arm in ("rm", "thumbs"):
        run_dir = tmp_path / arm
        run_dir.mkdir()
        written[arm] = yaml.safe_load(loop._write_config(run_dir, "http://127.0.0.1:1", seed=3, arm=arm).read_text())
    rm, thumbs = written["rm"]["trainer"], written["thumbs"]["trainer"]
    assert rm["dpo"] == {"beta": 0.2, "learning_rate": 1e-3}
    assert rm["adapter"] == {"seed": 3}
    assert thumbs["dpo"] == rm["dpo"]
    assert rm["pairs"] == {"policy": "best_vs_worst"}
    assert thumbs["pairs"] == {"policy": "best_vs_each"}
    assert "kl_budget" not in rm
    assert thumbs["kl_budget"] == {"max_nats": 1.0}


def test_sigterm_cancels_a_run_through_its_finally_and_ends_it_as_terminated() -> None:
    stopped = []

    async def run() -> None:
        try:
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            stopped.append("gateway")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="SIGTERM"):
        asyncio.run(terminable(run()))
    assert stopped == ["gateway"]
    assert signal.getsignal(signal.SIGTERM) == before  # the process's own handler is back


def test_sigterm_during_a_training_round_stops_the_round_too(tmp_path: Path) -> None:
    """A round runs as a child process: on SIGTERM the loop terminates it before it ends, rather than waiting for it
    (the loop used to wait in a thread for the round to finish, minutes, with the child still training)."""
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    async def signal_once_started() -> None:
        while not (pid_file.exists() and pid_file.read_text()):
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    async def run() -> None:
        killer = asyncio.create_task(signal_once_started())
        await run_child([sys.executable, "-c", script], 120, "a round")
        await killer

    with pytest.raises(Terminated):
        asyncio.run(terminable(run()))
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped: no such process
        os.kill(child, 0)


def test_a_child_past_its_time_is_stopped_with_one_line() -> None:
    with pytest.raises(LoopError, match="a round ran past 1 s and was stopped"):
        asyncio.run(run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1, "a round"))
    code, out, err = asyncio.run(run_child([sys.executable, "-c", "print('round trained: v1'); raise SystemExit(3)"], 30, "x"))
    assert (code, out, err) == (3, "round trained: v1\n", "")
