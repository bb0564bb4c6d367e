"""``bench prune``: early-pruned best-of-N (``selection: prune``) against plain best-of-N on one gateway (real vLLM and
the real reward model), the same held-out prompts, streamed, interleaved over rounds (the order alternates): tokens
generated per request (``usage``: every candidate's, the pruned ones' too), time to the first content and to the end,
and the mean gold reward of the answers (the toy world's gold, which the gateway never sees).

Goals (issue 25): ``token_ratio`` <= 0.6 and ``ttft_ratio`` <= 0.5, with the pruned answers' gold not below plain
best-of-N's lower 95% bound."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.settings import VLLM_FIELDS
from loadtest.servers import gateway, require_models, vllm
from loadtest.stats import over_rounds, percentile

HELP = "early-pruned best-of-N vs plain best-of-N: tokens, TTFT and gold reward (real models)"
SELECTIONS = ("best_of_n", "prune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/, reward_model/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts per round, selection and N")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--every-tokens", type=int, default=4, help="prune.every_tokens: tokens between checkpoints")
    parser.add_argument("--keep", type=float, default=0.5, help="prune.keep: the share that goes on at a checkpoint")
    parser.add_argument("--device", default="auto", help="the reward model's device (auto, cpu, cuda)")
    parser.add_argument("--vllm-nice", type=int, default=0, help="vLLM's CPU priority (managed_vllm.nice)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every sample runs to max_tokens (vLLM's ignore_eos): the long-answer arm")  # fmt: skip


@dataclass
class Answer:
    wall: float
    ttft: float
    tokens: int
    gold: float


async def _once(session: aiohttp.ClientSession, url: str, prompt: str, body: dict[str, Any]) -> Answer:
    from toyworld.evaluate import golds

    started = time.perf_counter()
    ttft: float | None = None
    tokens, text = 0, []
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if content := choice.get("delta", {}).get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(content)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    wall = time.perf_counter() - started
    return Answer(wall, ttft if ttft is not None else wall, tokens, golds([prompt], ["".join(text)])[0])


async def _batch(url: str, prompts: list[str], n: int, selection: str, args: argparse.Namespace, r: int) -> list[Answer]:
    async with aiohttp.ClientSession() as session:
        out = []
        for i, prompt in enumerate(prompts):
            body = {
                "model": "toy-bon", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, "n_candidates": n, "selection": selection,
                "seed": 1000 * r + 100 * i, **({"ignore_eos": True} if args.ignore_eos else {}),
            }  # fmt: skip
            out.append(await _once(session, url, prompt, body))
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from toyworld.evaluate import mean_ci
    from toyworld.world import prompt_sets

    models = Path(args.models)
    require_models(models)
    prompts = [task.prompt for task in prompt_sets(seed=0, n_train=0, n_heldout=args.prompts).heldout]
    runs: dict[tuple[str, int], list[list[Answer]]] = {(s, n): [] for s in SELECTIONS for n in args.n}
    with tempfile.TemporaryDirectory() as tmp, vllm(models / "policy", Path(tmp), nice=args.vllm_nice) as backend:
        scorer = {"kind": "local", "model_dir": str(models / "reward_model"), "device": args.device, "threads": 1}
        settings = {
            "backends": [{"url": backend, "model": "policy"}], "scorer": scorer, "max_tokens_limit": max(192, args.max_tokens),
            "max_n_candidates": max(16, *args.n), "prune": {"every_tokens": args.every_tokens, "keep": args.keep},
            "limits": {"max_candidate_tokens": max(args.n) * args.max_tokens},
            **({"vllm_fields": [*VLLM_FIELDS, "ignore_eos"]} if args.ignore_eos else {}),
        }  # fmt: skip
        with gateway(settings) as url:
            for selection in SELECTIONS:  # warm-up: connections, vLLM's and the reward model's first batches
                asyncio.run(_batch(url, prompts[:2], max(args.n), selection, args, -1))
            for r in range(args.rounds):
                for n in args.n:
                    order = SELECTIONS if (r + n) % 2 == 0 else SELECTIONS[::-1]
                    for selection in order:
                        runs[selection, n].append(asyncio.run(_batch(url, prompts, n, selection, args, r)))
                print(f"[prune] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def per_round(selection: str, n: int, field: str) -> list[float]:
        return [statistics.fmean(getattr(a, field) for a in batch) for batch in runs[selection, n]]

    def ratio(n: int, field: str) -> dict[str, Any]:
        pruned, plain = per_round("prune", n, field), per_round("best_of_n", n, field)
        return over_rounds([a / b for a, b in zip(pruned, plain, strict=True)])

    table, goals = [], []
    for n in args.n:
        row: dict[str, Any] = {"n_candidates": n}
        for selection in SELECTIONS:
            flat = [a for batch in runs[selection, n] for a in batch]
            gold = mean_ci([a.gold for a in flat])
            row[selection] = {
                "tokens_mean": round(statistics.fmean(a.tokens for a in flat), 1),
                "ttft_p50_ms": round(percentile([a.ttft for a in flat], 0.5) * 1000, 1),
                "wall_p50_ms": round(percentile([a.wall for a in flat], 0.5) * 1000, 1),
                "gold_mean": round(gold.mean, 4), "gold_ci95": [round(x, 4) for x in gold.ci95],
            }  # fmt: skip
        row["token_ratio"] = ratio(n, "tokens")
        row["ttft_ratio"] = ratio(n, "ttft")
        row["wall_ratio"] = ratio(n, "wall")
        table.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        goals += [
            {"goal": f"N={n}: token_ratio <= 0.6", "met": row["token_ratio"]["mean"] <= 0.6},
            {"goal": f"N={n}: ttft_ratio <= 0.5", "met": row["ttft_ratio"]["mean"] <= 0.5},
            {"goal": f"N={n}: pruned gold >= plain best-of-N's lower 95% bound",
             "met": row["prune"]["gold_mean"] >= row["best_of_n"]["gold_ci95"][0]},
        ]  # fmt: skip
    return {
        "benchmark": "prune", "cpu_count": os.cpu_count(), "device": args.device, "rounds": args.rounds,
        "prompts_per_round": len(prompts), "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
        "vllm_nice": args.vllm_nice,
        "prune": {"every_tokens": args.every_tokens, "keep": args.keep}, "results": table, "goals": goals,
    }  # fmt: skip
