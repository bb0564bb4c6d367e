"""``bench formats``: serving a version as a LoRA adapter (on the base's vLLM) vs as a full model (its own vLLM,
blue-green): request latency at N=4 (same requests, same token counts), base = the base model on the LoRA-enabled
vLLM; and the swap itself: adapter load + first request vs vLLM start + first request."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from gateway.vllm_process import free_port
from loadtest.servers import random_adapter
from loadtest.stats import over_rounds

HELP = "serving a version as a LoRA adapter vs a full model, and swapping each in"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per round and variant")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--swap-rounds", type=int, default=3)
    parser.add_argument("--cpu-binds", nargs=2, default=["0", "1"], help="VLLM_CPU_OMP_THREADS_BIND: base vLLM, full vLLM")


def _versions(base: Path, out: Path) -> tuple[Path, Path]:
    """A LoRA version of the trainer's default shape with non-zero weights, and the same weights merged (a full
    version). Serving cost does not depend on the values; vLLM is told to ignore EOS so token counts match."""
    from transformers import AutoTokenizer

    model = random_adapter(base, 0)
    lora, full = out / "lora", out / "full"
    model.save_pretrained(str(lora))
    model.merge_and_unload().save_pretrained(full)
    AutoTokenizer.from_pretrained(base).save_pretrained(full)
    return lora, full


async def _chat_batch(url: str, model: str, prompts: list[str], n: int, max_tokens: int) -> list[float]:
    """Seconds per request, one after another; every answer is exactly ``max_tokens`` long (EOS ignored)."""
    walls = []
    async with aiohttp.ClientSession() as session:
        for i, prompt in enumerate(prompts):
            body = {
                "model": model, "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": max_tokens,
                "ignore_eos": True, "seed": 1000 + i,
            }  # fmt: skip
            started = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                data = await response.json()
            walls.append(time.perf_counter() - started)
            if response.status != 200 or data["usage"]["completion_tokens"] != n * max_tokens:
                raise RuntimeError(f"{model} at {url}: {response.status} {str(data)[:300]}")
    return walls


def run(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA adapter vs full model: request latency, interleaved over rounds, and the time each takes to swap in."""
    from gateway.vllm_process import VLLMProcess
    from toyworld.world import prompt_sets

    base = Path(args.models) / "policy"
    if not (base / "config.json").is_file():
        raise SystemExit(f"no toy policy under {args.models}: run `python -m toyworld bootstrap --out {args.models}`")
    prompts = [task.prompt for task in prompt_sets(seed=0, n_train=0, n_heldout=args.prompts).heldout]
    walls: dict[str, list[float]] = {"base": [], "lora": [], "full": []}
    swap: dict[str, list[float]] = {"lora": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp_name:
        tmp = Path(tmp_name)
        lora_dir, full_dir = _versions(base, tmp)

        def serve(model: Path, name: str, lora: bool) -> VLLMProcess:
            # each on its own core, as the gateway's blue-green does (swap.full_cpu_binds): vLLM's CPU worker spins
            # while serving, and a second one pinned to the same core got no CPU here
            cores = {"VLLM_CPU_OMP_THREADS_BIND": args.cpu_binds[0 if lora else 1]} if args.cpu_binds else {}
            return VLLMProcess(model, name, port=free_port(), dtype="float32", max_model_len=256, lora=lora, env=cores,
                               log_path=tmp / f"vllm-{name}-{time.monotonic_ns()}.log")  # fmt: skip

        def load_lora(url: str, name: str) -> None:
            started = time.perf_counter()
            body = json.dumps({"lora_name": name, "lora_path": str(lora_dir)}).encode()
            request = urllib.request.Request(f"{url}/v1/load_lora_adapter", body, {"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=120).close()
            asyncio.run(_chat_batch(url, name, prompts[:1], args.n, args.max_tokens))
            swap["lora"].append(time.perf_counter() - started)

        blue, green = serve(base, "policy", True), serve(full_dir, "policy@full", False)
        try:
            for process in (blue, green):
                process.start()
                process.wait_healthy(600)
            load_lora(blue.url, "policy@lora")
            targets = {"base": (blue.url, "policy"), "lora": (blue.url, "policy@lora"), "full": (green.url, "policy@full")}
            for name in targets:  # warm-up
                asyncio.run(_chat_batch(*targets[name], prompts[:2], args.n, args.max_tokens))
            for r in range(args.rounds):
                order = list(targets)[r % 3 :] + list(targets)[: r % 3]
                for name in order:
                    batch = asyncio.run(_chat_batch(*targets[name], prompts, args.n, args.max_tokens))
                    walls[name].append(statistics.fmean(batch))
                print(f"[formats] round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k} {v[-1] * 1000:.0f} ms" for k, v in walls.items()), file=sys.stderr, flush=True)  # fmt: skip
            green.stop()
            for r in range(args.swap_rounds):  # a swap each: a fresh adapter name, a fresh vLLM on the full version
                load_lora(blue.url, f"policy@lora{r}")
                green = serve(full_dir, "policy@full", False)
                started = time.perf_counter()
                green.start()
                green.wait_healthy(600)
                asyncio.run(_chat_batch(green.url, "policy@full", prompts[:1], args.n, args.max_tokens))
                swap["full"].append(time.perf_counter() - started)
                green.stop()
                print(f"[formats] swap {r + 1}/{args.swap_rounds}: lora {swap['lora'][-1]:.2f} s, "
                      f"full {swap['full'][-1]:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            blue.stop()
            green.stop()

    def ratio(a: str, b: str) -> dict[str, Any]:
        return over_rounds([x / y for x, y in zip(walls[a], walls[b], strict=True)])

    return {
        "benchmark": "formats",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "prompts_per_round": len(prompts),
        "n": args.n,
        "max_tokens": args.max_tokens,
        "request_ms_median": {name: round(statistics.median(v) * 1000, 1) for name, v in walls.items()},
        "lora_over_full": ratio("lora", "full"),
        "full_over_base": ratio("full", "base"),
        "swap_s_median": {name: round(statistics.median(v), 2) for name, v in swap.items() if v},
        "swap_s": {name: [round(x, 2) for x in v] for name, v in swap.items()},
    }
