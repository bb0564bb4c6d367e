"""The project's benchmarks; each prints one JSON object as its last line.

  overhead   what the gateway adds in front of a mock backend (0 ms and 50 ms), N=1, scoring off,
             at 1 and 32 concurrent requests; baseline = the same requests sent to the backend
  logging    the log's cost: the same gateway (mock backend, N=1) with the log on and off
  bon        best-of-N through the gateway (real vLLM + the real reward model) for N = 1, 2, 4, 8;
             baseline = the same requests sent straight to that vLLM (one request with n=N, no scoring)
  train      one DPO round's training on the default models with the reference log-probs cached
             (computed once per pair; cold: this round's pairs are new; warm: seen in an earlier round);
             baseline = recomputed by TRL at every step (``dpo.cache_reference: false``)
  formats    serving a version as a LoRA adapter (on the base's vLLM) vs as a full model (its own vLLM,
             blue-green): request latency at N=4 (same requests, same token counts), base = the base model on
             the LoRA-enabled vLLM; and the swap itself: adapter load + first request vs vLLM start + first request

Baseline and gateway run in the same process tree and are interleaved over several rounds
(the order alternates per round), because these machines are noisy; each ratio is reported
with a 95% interval over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.vllm_process import free_port

T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09, 30: 2.04}
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 16}


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean with a 95% t-interval over rounds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": round(mean, 4), "ci95": [round(mean, 4), round(mean, 4)], "rounds": len(values)}
    df = len(values) - 1
    t = T_975[max(k for k in T_975 if k <= df)]
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "rounds": len(values)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_http(url: str, timeout_s: float = 120) -> None:
    import urllib.error

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.2)


@contextmanager
def _process(args: list[str], health: str) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(health)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def mock_backend(delay_ms: float) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _process(
        [sys.executable, "-m", "loadtest.mock_backend", "--port", str(port), "--delay-ms", str(delay_ms)], f"{url}/health"
    ):
        yield url


@contextmanager
def gateway(settings: dict[str, Any]) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        store = {"data_dir": str(Path(tmp) / "data"), **settings.get("store", {})}  # the log stays in the temporary dir
        data = {**settings, "store": store, "port": port, "models_preset": None}
        config.write_text(yaml.safe_dump(data))
        url = f"http://127.0.0.1:{port}"
        with _process([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--no-bootstrap"], f"{url}/health"):
            yield url


async def load(url: str, body: dict[str, Any], requests: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` POSTs at ``concurrency``, and the wall time of the batch."""
    latencies: list[float] = []
    remaining = requests
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def compare(
    targets: dict[str, tuple[str, dict[str, Any]]], rounds: int, requests: int, concurrency: int
) -> dict[str, list[dict[str, float]]]:
    """p50, p99 and throughput per round of each target (a name → (url, body)); the order alternates per round."""
    for url, body in targets.values():  # warm-up: connections, caches
        asyncio.run(load(url, body, concurrency * 5, concurrency))
    out: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            url, body = targets[name]
            latencies, wall = asyncio.run(load(url, body, requests, concurrency))
            stats = {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "rps": len(latencies) / wall}
            out[name].append(stats)
    return out


def summary(base: list[dict[str, float]], treat: list[dict[str, float]], names: tuple[str, str]) -> dict[str, Any]:
    """Medians of each, and per-round differences and ratios (treatment over baseline) with 95% intervals."""
    per_round = list(zip(base, treat, strict=True))
    return {
        f"{names[0]}_p50_ms": round(statistics.median(x["p50"] for x in base) * 1000, 3),
        f"{names[1]}_p50_ms": round(statistics.median(x["p50"] for x in treat) * 1000, 3),
        "added_p50_ms": mean_ci([(b["p50"] - a["p50"]) * 1000 for a, b in per_round]),
        "added_p99_ms": mean_ci([(b["p99"] - a["p99"]) * 1000 for a, b in per_round]),
        "p50_ratio": mean_ci([b["p50"] / a["p50"] for a, b in per_round]),
        "p99_ratio": mean_ci([b["p99"] / a["p99"] for a, b in per_round]),
        f"{names[0]}_rps": round(statistics.median(x["rps"] for x in base), 1),
        f"{names[1]}_rps": round(statistics.median(x["rps"] for x in treat), 1),
    }


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for delay in args.delays:
        with mock_backend(delay) as backend:
            settings = {
                "backends": [{"url": backend, "model": "policy"}],
                "scoring_enabled": False,
                "n_candidates": 1,
                "store": {"enabled": False},  # the log's own cost: `bench logging`
            }
            with gateway(settings) as gw:
                for concurrency in args.concurrency:
                    targets = {"direct": (backend, {**BODY, "model": "policy"}), "gateway": (gw, BODY)}
                    rounds = compare(targets, args.rounds, args.requests, concurrency)
                    row = {"delay_ms": delay, "concurrency": concurrency}
                    results.append(row | summary(rounds["direct"], rounds["gateway"], ("direct", "gateway")))
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    goals = []
    for row in results:
        if row["delay_ms"] == 0:
            limit = 3.0 if row["concurrency"] == 1 else 10.0
            goals.append(
                {"goal": f"added p50 <= {limit} ms at 0 ms, c={row['concurrency']}", "met": row["added_p50_ms"]["mean"] <= limit}
            )
        else:
            goals.append(
                {
                    "goal": f"p50_ratio <= 1.05 at {row['delay_ms']} ms, c={row['concurrency']}",
                    "met": row["p50_ratio"]["mean"] <= 1.05,
                }
            )
            goals.append(
                {
                    "goal": f"p99_ratio <= 1.15 at {row['delay_ms']} ms, c={row['concurrency']}",
                    "met": row["p99_ratio"]["mean"] <= 1.15,
                }
            )
    return {
        "benchmark": "overhead",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "results": results,
        "goals": goals,
    }


# ---- logging: the log's cost on the request path ----


def logging_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The same gateway config with the log on (SQLite, or ``--db``) and off, in front of one backend."""
    results = []
    for delay in args.delays:
        with mock_backend(delay) as backend:
            base = {"backends": [{"url": backend, "model": "policy"}], "scoring_enabled": False, "n_candidates": 1}
            on_store: dict[str, Any] = {"enabled": True}
            if args.db:
                on_store |= {"url": args.db, "id_secret": "bench-logging-secret"}
            with gateway(base | {"store": {"enabled": False}}) as off, gateway(base | {"store": on_store}) as on:
                for concurrency in args.concurrency:
                    rounds = compare({"off": (off, BODY), "on": (on, BODY)}, args.rounds, args.requests, concurrency)
                    row = {"delay_ms": delay, "concurrency": concurrency}
                    results.append(row | summary(rounds["off"], rounds["on"], ("log_off", "log_on")))
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
                logged = sum(metric(on, m) or 0.0 for m in ("bon_log_records_written_total", "bon_log_records_spooled_total"))
                if logged == 0:
                    raise RuntimeError("the log-on gateway logged nothing: the benchmark would compare two identical paths")
    goals = [
        {"goal": f"p50_ratio <= 1.02 at {r['delay_ms']} ms, c={r['concurrency']}", "met": r["p50_ratio"]["mean"] <= 1.02}
        for r in results
    ]
    head = next((r for r in results if r["delay_ms"] > 0 and r["concurrency"] == 1), results[0])
    return {
        "benchmark": "logging",
        "store": "postgresql" if args.db else "sqlite",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "p50_ratio": head["p50_ratio"],
        "p99_ratio": head["p99_ratio"],
        "headline": f"delay {head['delay_ms']} ms, concurrency {head['concurrency']}",
        "results": results,
        "goals": goals,
    }


def metric(url: str, name: str) -> float | None:
    """The first sample of ``name`` on ``url``'s /metrics, or None when it is not exposed."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith((f"{name} ", f"{name}{{")):
                return float(line.rsplit(" ", 1)[1])
    return None


# ---- bon: the cost of best-of-N through the gateway vs vLLM's own n=N ----


@dataclass
class Timing:
    wall: float
    ttft: float
    tokens: int


async def _stream_once(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Timing:
    """One streaming request: wall time to ``[DONE]``, time to the first content, completion tokens (all N)."""
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    wall = time.perf_counter() - started
    return Timing(wall, ttft if ttft is not None else wall, tokens)


async def _bon_batch(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[Timing]:
    queue = list(reversed(bodies))
    out: list[Timing] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            while queue:
                out.append(await _stream_once(session, url, queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _bon_bodies(prompts: list[str], n: int, target: str, max_tokens: int) -> list[dict[str, Any]]:
    """The same requests for both targets; a seed per prompt makes vLLM sample the same tokens for both."""
    common = {"max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    bodies = []
    for i, prompt in enumerate(prompts):
        body = {**common, "messages": [{"role": "user", "content": prompt}], "seed": 1000 + i}
        if target == "direct":
            body |= {"model": "policy", "n": n}
        else:
            body |= {"model": "toy-bon", "n_candidates": n}
        bodies.append(body)
    return bodies


def bon(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.vllm_process import VLLMProcess
    from trainer.toyworld.world import prompt_sets

    models = Path(args.models)
    if not (models / "policy" / "config.json").is_file() or not (models / "reward_model" / "config.json").is_file():
        raise SystemExit(f"no toy models under {models}: run `make models` (or `python -m trainer bootstrap --out {models}`)")
    prompts = [task.prompt for task in prompt_sets(seed=0, n_train=0, n_heldout=args.prompts).heldout]
    with tempfile.TemporaryDirectory() as tmp:
        vllm = VLLMProcess(models / "policy", "policy", port=free_port(), log_path=Path(tmp) / "vllm.log")
        vllm.start()
        try:
            vllm.wait_healthy(600)
            settings = {
                "backends": [{"url": vllm.url, "model": "policy"}],
                "scorer": {"kind": "local", "model_dir": str(models / "reward_model"), "device": args.device, "threads": 1},
                "max_tokens_limit": max(192, args.max_tokens),
            }
            with gateway(settings) as gw:
                urls = {"direct": vllm.url, "gateway": gw}
                for target in urls:  # warm-up: connections, vLLM's and the reward model's first batches
                    for n in args.n:
                        asyncio.run(_bon_batch(urls[target], _bon_bodies(prompts[:2], n, target, args.max_tokens), 1))
                rounds: dict[tuple[str, int], list[list[Timing]]] = {(t, n): [] for t in urls for n in args.n}
                for r in range(args.rounds):
                    for n in args.n:
                        order = ["direct", "gateway"] if (r + n) % 2 == 0 else ["gateway", "direct"]
                        for target in order:
                            bodies = _bon_bodies(prompts, n, target, args.max_tokens)
                            rounds[target, n].append(asyncio.run(_bon_batch(urls[target], bodies, args.concurrency)))
                    print(f"[bon] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            vllm.stop()

    def mean_wall(target: str, n: int, r: int) -> float:
        return statistics.fmean(t.wall for t in rounds[target, n][r])

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> dict[str, Any]:
        return mean_ci([mean_wall(*a, r) / mean_wall(*b, r) for r in range(args.rounds)])

    table = []
    for n in args.n:
        row: dict[str, Any] = {"n_candidates": n}
        for target in urls:
            flat = [t for batch in rounds[target, n] for t in batch]
            row[target] = {
                "wall_p50_ms": round(percentile([t.wall for t in flat], 0.5) * 1000, 1),
                "wall_p99_ms": round(percentile([t.wall for t in flat], 0.99) * 1000, 1),
                "ttft_p50_ms": round(percentile([t.ttft for t in flat], 0.5) * 1000, 1),
                "tokens_mean": round(statistics.fmean(t.tokens for t in flat), 1),
            }
        row["gateway_over_direct"] = ratio(("gateway", n), ("direct", n))
        table.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "benchmark": "bon",
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "rounds": args.rounds,
        "prompts_per_round": len(prompts),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "results": table,
    }
    if 1 in args.n and 4 in args.n:
        report |= {
            "wall_ratio_n4": ratio(("gateway", 4), ("gateway", 1)),
            "direct_wall_ratio_n4": ratio(("direct", 4), ("direct", 1)),
            "bon_overhead_ratio_n4": ratio(("gateway", 4), ("direct", 4)),
            "gateway_overhead_ratio": ratio(("gateway", 1), ("direct", 1)),
        }
        report["goals"] = [
            {"goal": "bon_overhead_ratio_n4 <= 1.1", "met": report["bon_overhead_ratio_n4"]["mean"] <= 1.1},
            {"goal": "gateway_overhead_ratio <= 1.05", "met": report["gateway_overhead_ratio"]["mean"] <= 1.05},
            {
                "goal": "wall_ratio_n4 <= 1.3 (on a GPU; on 2 CPU cores vLLM's own n=4 costs ~1.5x)",
                "met": report["wall_ratio_n4"]["mean"] <= 1.3,
            },
        ]
    return report


def _toy_pairs(tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` toy-world pairs: a right answer in the SFT mix of styles against a wrong one, as the log stores them."""
    import random

    from trainer.toyworld.answers import Fault, Style, render
    from trainer.toyworld.world import sample_task

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        task = sample_task(rng)
        chosen = render(task, rng.choice(list(Style)), Fault.NONE, rng)
        rejected = render(task, rng.choice(list(Style)), Fault.WRONG, rng)
        row: dict[str, Any] = {"prompt": [{"role": "user", "content": task.prompt}]}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            row[side] = [{"role": "assistant", "content": text}]
            row[f"{side}_token_ids"] = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        pairs.append(row)
    return pairs


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of ``dpo.train`` (the trainer's set-up, reference log-probs, the epochs) per variant and round."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainer import adapter, dpo
    from trainer.settings import DpoSettings

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base = Path(args.models) / "policy"
    tokenizer = AutoTokenizer.from_pretrained(base)
    settings = DpoSettings(epochs=args.epochs)  # the defaults of a round (bf16 autocast as in TRL, batch 16, LoRA r 16)
    reference = f"{dpo.reference_id(base)}-{'bf16' if settings.bf16 else 'fp32'}"
    seconds: dict[str, list[float]] = {"recompute": [], "cached_cold": [], "cached_warm": []}
    losses: dict[str, list[float]] = {name: [] for name in seconds}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for r in range(args.rounds):
            made = dpo.rows(_toy_pairs(tokenizer, args.pairs, seed=1000 + r), tokenizer, settings.max_length)
            cache = dpo.RefCache(Path(tmp) / f"ref-{r}.sqlite", reference)  # empty: this round's pairs are new
            order = ["recompute", "cached_cold", "cached_warm"]
            order = order if r % 2 == 0 else ["cached_cold", "cached_warm", "recompute"]  # warm needs cold first
            for name in order:
                torch.manual_seed(settings.seed)
                init = adapter.policy_model(base, None, settings)
                result, _ = dpo.train(init, tokenizer, made.rows, settings, Path(tmp) / "work",
                                      None if name == "recompute" else cache, progress=False)  # fmt: skip
                if name == "cached_cold" and result.ref_computed != 2 * len(made.rows):
                    raise RuntimeError(f"the cold cache was not cold: {result.ref_cached} cached")
                if name == "cached_warm" and result.ref_computed != 0:
                    raise RuntimeError(f"the warm cache was not warm: {result.ref_computed} computed")
                seconds[name].append(result.seconds)
                losses[name].append(result.loss)
                print(f"round {r + 1} {name}: {result.seconds:.2f} s, loss {result.loss:.4f}", file=sys.stderr, flush=True)
    pairs = len(made.rows)
    return {
        "benchmark": "train",
        "pairs": pairs,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "seconds": {name: round(statistics.median(v), 3) for name, v in seconds.items()},
        "ref_cache_ratio": mean_ci([c / b for c, b in zip(seconds["cached_cold"], seconds["recompute"], strict=True)]),
        "ref_cache_ratio_warm": mean_ci([c / b for c, b in zip(seconds["cached_warm"], seconds["recompute"], strict=True)]),
        "pairs_per_s": {name: round(pairs * args.epochs / statistics.median(v), 1) for name, v in seconds.items()},
        "loss_abs_diff_cached_vs_recompute": round(
            max(abs(c - b) for c, b in zip(losses["cached_cold"], losses["recompute"], strict=True)), 6
        ),
        "goal": {"ref_cache_ratio": "<= 0.8"},
    }


def _versions(base: Path, out: Path) -> tuple[Path, Path]:
    """A LoRA version of the trainer's default shape with non-zero weights, and the same weights merged (a full
    version). Serving cost does not depend on the values; vLLM is told to ignore EOS so token counts match."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from trainer import adapter
    from trainer.settings import DpoSettings

    torch.manual_seed(0)
    init = adapter.policy_model(base, None, DpoSettings())
    model = get_peft_model(init.base, init.lora)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.01)
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


def formats(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA adapter vs full model: request latency, interleaved over rounds, and the time each takes to swap in."""
    from gateway.vllm_process import VLLMProcess
    from trainer.toyworld.world import prompt_sets

    base = Path(args.models) / "policy"
    if not (base / "config.json").is_file():
        raise SystemExit(f"no toy policy under {args.models}: run `python -m trainer bootstrap --out {args.models}`")
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
        return mean_ci([x / y for x, y in zip(walls[a], walls[b], strict=True)])

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead", help="gateway overhead in front of a mock backend")
    over.add_argument("--rounds", type=int, default=6)
    over.add_argument("--requests", type=int, default=300, help="requests per round and target")
    over.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    over.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")
    logs = sub.add_parser("logging", help="the log's cost: the same gateway with the log on and off")
    logs.add_argument("--rounds", type=int, default=6)
    logs.add_argument("--requests", type=int, default=300, help="requests per round and target")
    logs.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    logs.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")
    logs.add_argument("--db", default=None, help="log to this database (e.g. PostgreSQL) instead of a temporary SQLite file")
    best = sub.add_parser("bon", help="best-of-N through the gateway vs vLLM's own n=N (real models)")
    best.add_argument("--models", default="models/default", help="the toy models (policy/, reward_model/)")
    best.add_argument("--rounds", type=int, default=5)
    best.add_argument("--prompts", type=int, default=12, help="held-out prompts per round, target and N")
    best.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    best.add_argument("--concurrency", type=int, default=1)
    best.add_argument("--max-tokens", type=int, default=64)
    best.add_argument("--device", default="auto", help="the reward model's device (auto, cpu, cuda)")
    trn = sub.add_parser("train", help="a DPO round's training with reference log-probs cached vs recomputed")
    trn.add_argument("--models", default="models/default", help="the toy models (policy/)")
    trn.add_argument("--rounds", type=int, default=3)
    trn.add_argument("--pairs", type=int, default=128, help="pairs per round")
    trn.add_argument("--epochs", type=float, default=2.0, help="a round's epochs (the default round's)")
    fmt = sub.add_parser("formats", help="serving a version as a LoRA adapter vs a full model, and swapping each in")
    fmt.add_argument("--models", default="models/default", help="the toy models (policy/)")
    fmt.add_argument("--rounds", type=int, default=6)
    fmt.add_argument("--prompts", type=int, default=8, help="held-out prompts per round and variant")
    fmt.add_argument("--n", type=int, default=4)
    fmt.add_argument("--max-tokens", type=int, default=64)
    fmt.add_argument("--swap-rounds", type=int, default=3)
    fmt.add_argument("--cpu-binds", nargs=2, default=["0", "1"], help="VLLM_CPU_OMP_THREADS_BIND: base vLLM, full vLLM")
    args = parser.parse_args(argv)
    commands = {"overhead": overhead, "logging": logging_cost, "bon": bon, "train": train, "formats": formats}
    report = commands[args.command](args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
