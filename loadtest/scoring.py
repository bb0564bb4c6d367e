"""``bench scoring``: the reward model scoring N candidates in one batch vs N single passes.

The gateway's own scorer (``gateway.score.LocalRewardModel``: the worker thread, its batcher, ``threads`` torch
threads, on GPU when there is one) on the toy world's answers to held-out prompts. Per round and N, the same N
conversations are scored once as one request (one forward pass) and once as N requests one after the other (N
passes: what scoring each candidate alone as it finishes would cost at most); the order alternates per round.
Reports each N's ratio (batch / singles) with its 95% interval over rounds. Knows nothing of vLLM: the answers
are the toy world's, not generated.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.stats import over_rounds

HELP = "the reward model scoring N candidates in one batch vs N single passes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (reward_model/)")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5, help="timings per round and arm (their median is the round's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the gateway's scorer.threads)")
    parser.add_argument("--device", default="auto")


def conversations(n: int, seed: int) -> list[Any]:
    """``n`` answers in the SFT mix of styles and faults to one held-out task, as the gateway hands them over."""
    from gateway.score import Conversation
    from toyworld.answers import Fault, Style, render
    from toyworld.world import sample_task

    rng = random.Random(seed)
    task = sample_task(rng)
    messages = [{"role": "user", "content": task.prompt}]
    return [Conversation(messages, render(task, rng.choice(list(Style)), rng.choice(list(Fault)), rng)) for _ in range(n)]


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.score import LocalRewardModel

    scorer = LocalRewardModel(Path(args.models) / "reward_model", "bench", device=args.device, threads=args.threads)
    await scorer.start()
    try:

        async def batch(convs: list[Any]) -> float:
            start = time.perf_counter()
            await scorer.score(convs)
            return time.perf_counter() - start

        async def singles(convs: list[Any]) -> float:
            start = time.perf_counter()
            for conversation in convs:
                await scorer.score([conversation])
            return time.perf_counter() - start

        arms = {"batch": batch, "singles": singles}
        for n in args.n:  # warm-up: first passes at each shape
            await batch(conversations(n, 0))
            await singles(conversations(n, 0))
        seconds: dict[int, dict[str, list[float]]] = {n: {name: [] for name in arms} for n in args.n}
        for r in range(args.rounds):
            for n in args.n:
                convs = conversations(n, seed=1000 + r)
                order = list(arms) if r % 2 == 0 else list(reversed(arms))
                for name in order:
                    seconds[n][name].append(statistics.median([await arms[name](convs) for _ in range(args.reps)]))
            print(f"round {r + 1}: " + ", ".join(f"N={n} {seconds[n]['batch'][-1] / seconds[n]['singles'][-1]:.2f}"
                                                 for n in args.n), file=sys.stderr, flush=True)  # fmt: skip
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        return {"device": device, "seconds": seconds}
    finally:
        await scorer.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    measured = asyncio.run(_measure(args))
    seconds: dict[int, dict[str, list[float]]] = measured["seconds"]
    rows = {
        str(n): {
            "batch_ms": round(1000 * statistics.median(arm["batch"]), 2),
            "singles_ms": round(1000 * statistics.median(arm["singles"]), 2),
            "ratio": over_rounds([b / s for b, s in zip(arm["batch"], arm["singles"], strict=True)]),
        }
        for n, arm in seconds.items()
    }
    return {
        "benchmark": "scoring", "device": measured["device"], "threads": args.threads, "rounds": args.rounds,
        "reps": args.reps, "results": rows, "goal": {"ratio": "<= 0.5"},
    }  # fmt: skip
