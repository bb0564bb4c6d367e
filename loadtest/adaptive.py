"""``bench adaptive``: adaptive N (``gateway.adaptive``) against a fixed N, on real vLLM and the real reward model.

Two measurements, each interleaved over rounds with its baseline (the order alternates), on the toy world's held-out
prompts, every request declaring its task (``metadata.task``: the toy task kind):
- **generations**: a gateway with adaptive N on (``n_candidates`` = the cap) against one serving the cap to every
  request, the same prompts and seeds: candidates generated (``x-bon-n``), and the mean gold reward of the answers
  (the toy world's gold, which the gateway never sees), paired per prompt. The adaptive gateway first learns from
  ``--warmup`` training prompts (its cold start, counted apart). Goal (issue 25): ``generation_ratio`` <= 0.8 with the
  adaptive answers' gold not below the fixed N's lower 95% bound.
- **budget**: the fixed N's p99 latency at ``--concurrency`` is the budget; then, at twice that concurrency, the fixed
  N against requests carrying that budget (``latency_budget_ms``). Goal: their p99 within the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.servers import gateway, require_models, vllm
from loadtest.stats import over_rounds, percentile

HELP = "adaptive N vs a fixed N: generations at equal gold, p99 under a latency budget at twice the load (real models)"
ARMS = ("fixed", "adaptive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/, reward_model/)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=60, help="held-out prompts per round and arm")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="the caps (the fixed arm's N)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (the budget's load; doubled after)")
    parser.add_argument("--warmup", type=int, default=240, help="training prompts the adaptive gateway learns from first")
    parser.add_argument("--keep-gain", type=float, default=0.9, help="adaptive.keep_gain")
    parser.add_argument("--min-requests", type=int, default=20, help="adaptive.min_requests")
    parser.add_argument("--budget-rounds", type=int, default=3, help="rounds of the budget measurement (0: skip it)")
    parser.add_argument("--device", default="auto", help="the reward model's device (auto, cpu, cuda)")


@dataclass
class Answer:
    prompt: str
    n: int
    seconds: float
    gold: float
    reason: str | None


async def _ask(session: aiohttp.ClientSession, url: str, task: Any, seed: int, extra: dict[str, Any]) -> Answer:
    from toyworld.evaluate import golds

    body = {
        "model": "toy-bon", "messages": [{"role": "user", "content": task.prompt}], "seed": seed,
        "metadata": {"task": task.kind.value}, **extra,
    }  # fmt: skip
    started = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {(await response.text())[:300]}")
        answer = await response.json()
        n, reason = int(response.headers["x-bon-n"]), response.headers.get("x-bon-adaptive")
    seconds = time.perf_counter() - started
    text = answer["choices"][0]["message"]["content"] or ""
    return Answer(task.prompt, n, seconds, golds([task.prompt], [text])[0], reason)


async def _batch(url: str, tasks: list[Any], r: int, concurrency: int, extra: dict[str, Any]) -> list[Answer]:
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int, task: Any) -> Answer:
            async with gate:
                return await _ask(session, url, task, 1000 * r + i, extra)

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks))))


def _settings(backend: str, models: Path, args: argparse.Namespace, n: int, adaptive: bool) -> dict[str, Any]:
    scorer = {"kind": "local", "model_dir": str(models / "reward_model"), "device": args.device, "threads": 1}
    return {
        "backends": [{"url": backend, "model": "policy"}], "scorer": scorer, "n_candidates": n,
        "max_n_candidates": max(16, n), "max_tokens_limit": max(192, args.max_tokens), "store": {"enabled": False},
        "adaptive": {"enabled": adaptive, "keep_gain": args.keep_gain, "min_requests": args.min_requests},
    }  # fmt: skip


def _generations(urls: dict[str, str], n: int, args: argparse.Namespace) -> dict[str, Any]:
    from toyworld.evaluate import mean_ci
    from toyworld.world import prompt_sets

    sets = prompt_sets(seed=0, n_train=args.warmup, n_heldout=args.rounds * args.prompts)
    pool = list(sets.heldout)  # fewer than asked when a task kind runs out of distinct prompts: then reused, new seeds
    random.Random(0).shuffle(pool)
    started = time.perf_counter()
    warm = asyncio.run(_batch(urls["adaptive"], list(sets.train), -1, args.concurrency, {}))
    warmup = {"requests": len(warm), "generations": sum(a.n for a in warm), "seconds": round(time.perf_counter() - started, 1)}
    runs: dict[str, list[list[Answer]]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        tasks = [pool[(r * args.prompts + i) % len(pool)] for i in range(args.prompts)]
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            runs[arm].append(asyncio.run(_batch(urls[arm], tasks, r, args.concurrency, {})))
        print(f"[adaptive] N={n}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    flat = {arm: [a for batch in runs[arm] for a in batch] for arm in ARMS}
    ratios = [sum(a.n for a in ad) / sum(a.n for a in fx) for ad, fx in zip(runs["adaptive"], runs["fixed"], strict=True)]
    diffs = [a.gold - f.gold for a, f in zip(flat["adaptive"], flat["fixed"], strict=True)]  # same prompt, same seed
    golds = {arm: mean_ci([a.gold for a in flat[arm]]) for arm in ARMS}
    diff = mean_ci(diffs)
    reasons: dict[str, int] = {}
    for a in flat["adaptive"]:
        reasons[a.reason or "none"] = reasons.get(a.reason or "none", 0) + 1
    row = {
        "n_cap": n, "warmup": warmup, "generation_ratio": over_rounds(ratios),
        "adaptive_mean_n": round(statistics.fmean(a.n for a in flat["adaptive"]), 3), "adaptive_reasons": reasons,
        **{f"{arm}_gold": {"mean": round(golds[arm].mean, 4), "ci95": [round(x, 4) for x in golds[arm].ci95]} for arm in ARMS},
        "gold_diff": {"mean": round(diff.mean, 4), "ci95": [round(x, 4) for x in diff.ci95]},
    }  # fmt: skip
    print(f"[adaptive] {row}", file=sys.stderr, flush=True)
    return row


def _budget(urls: dict[str, str], n: int, args: argparse.Namespace) -> dict[str, Any]:
    from toyworld.world import prompt_sets

    tasks = list(prompt_sets(seed=1, n_train=0, n_heldout=args.prompts * 2).heldout)
    base = asyncio.run(_batch(urls["fixed"], tasks, 0, args.concurrency, {}))
    budget_ms = percentile([a.seconds for a in base], 0.99) * 1000
    extra = {"fixed": {}, "adaptive": {"latency_budget_ms": budget_ms}}
    runs: dict[str, list[list[Answer]]] = {arm: [] for arm in ARMS}
    for r in range(args.budget_rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            runs[arm].append(asyncio.run(_batch(urls["fixed"], tasks, r + 1, 2 * args.concurrency, extra[arm])))
        print(f"[adaptive] budget: round {r + 1}/{args.budget_rounds} done", file=sys.stderr, flush=True)
    flat = {arm: [a for batch in runs[arm] for a in batch] for arm in ARMS}
    p99 = {arm: percentile([a.seconds for a in flat[arm]], 0.99) * 1000 for arm in ARMS}
    row = {
        "n_cap": n, "concurrency": args.concurrency, "budget_ms": round(budget_ms, 1),
        "budget_p50_ms": round(percentile([a.seconds for a in base], 0.5) * 1000, 1),
        "twice_concurrency": 2 * args.concurrency,
        "p99_ms": {arm: round(p99[arm], 1) for arm in ARMS},
        "p99_over_budget": {arm: [round(percentile([a.seconds for a in b], 0.99) * 1000 / budget_ms, 3) for b in runs[arm]]
                            for arm in ARMS},
        "budgeted_mean_n": round(statistics.fmean(a.n for a in flat["adaptive"]), 3),
    }  # fmt: skip
    print(f"[adaptive] {row}", file=sys.stderr, flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = Path(args.models)
    require_models(models)
    table, goals = [], []
    budget: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp, vllm(models / "policy", Path(tmp)) as backend:
        for n in args.n:
            with ExitStack() as stack:
                urls = {arm: stack.enter_context(gateway(_settings(backend, models, args, n, arm == "adaptive")))
                        for arm in ARMS}  # fmt: skip
                row = _generations(urls, n, args)
                table.append(row)
                goals += [
                    {"goal": f"N={n}: generation_ratio <= 0.8", "met": row["generation_ratio"]["mean"] <= 0.8},
                    {"goal": f"N={n}: adaptive gold >= fixed N's lower 95% bound",
                     "met": row["adaptive_gold"]["mean"] >= row["fixed_gold"]["ci95"][0]},
                ]  # fmt: skip
                if budget is None and args.budget_rounds > 0:  # the budget is per request: the fixed gateway serves both
                    budget = _budget(urls, n, args)
                    goals.append({"goal": f"N={n}: p99 at twice the load within the budget",
                                  "met": budget["p99_ms"]["adaptive"] <= budget["budget_ms"]})  # fmt: skip
    return {
        "benchmark": "adaptive", "cpu_count": os.cpu_count(), "device": args.device, "rounds": args.rounds,
        "prompts_per_round": args.prompts, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
        "keep_gain": args.keep_gain, "min_requests": args.min_requests, "results": table, "budget": budget, "goals": goals,
    }  # fmt: skip
