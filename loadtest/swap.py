"""``bench swap``: steady load through the gateway (real vLLM with runtime LoRA, the real reward model, N=4) while
policy versions change under it: a hot-swap of the current version, a canary trial promoted by the admin
endpoint, and a canary trial rolled back, each to a version not served before (so every change loads a new
adapter into vLLM; all are published before the load starts). Repeated ``--rounds`` times. Reports every non-2xx
answer (goal 0) and, per kind of change and round, the p99 of the requests that started in its window (from the
pointer's move until the new state is served and ``--settle-s`` more) over the p99 of the steady windows in between
(goal <= 2), with its interval.
The versions are LoRA adapters with random (small) weights and their probes, saved as a round saves one:
what a swap costs does not depend on what was learned."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.servers import gateway, random_adapter, require_models, vllm
from loadtest.stats import over_rounds, percentile

HELP = "non-2xx and p99 while versions are hot-swapped, promoted and rolled back under load"
CHANGES = ("swap", "promote", "rollback")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/, reward_model/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=15.0, help="steady load before each change")
    parser.add_argument("--settle-s", type=float, default=3.0, help="the window goes on this long after the change")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)


@dataclass
class Load:
    """Every request's start, latency, status and the version that answered."""

    done: list[tuple[float, float, int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: bool = False

    def served_since(self, since: float) -> set[str]:
        return {v for start, _, status, v in self.done if start >= since and status == 200}


def _publish(registry: Any, base: Path, seed: int) -> str:
    """A LoRA version (the trainer's adapter shape, small random weights) with its probe."""
    from transformers import AutoTokenizer

    from versioning import probe

    model = random_adapter(base, seed)
    tokenizer = AutoTokenizer.from_pretrained(base)

    def write(directory: Path) -> None:
        model.save_pretrained(str(directory))
        probe.compute(model, probe.sequences(tokenizer)).save(directory)

    version: str = registry.publish("policy", write, format="lora", parent=None, algorithm="bench").version
    return version


async def _drive(url: str, load: Load, concurrency: int, n: int, max_tokens: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker(w: int) -> None:
            i = 0
            while not load.stop:
                i += 1
                body = {
                    "model": "toy-bon", "messages": [{"role": "user", "content": f"What is {i % 9 + 1} plus {w + 2}?"}],
                    "max_tokens": max_tokens, "n_candidates": n, "user": f"u{w}-{i % 50}",  # users spread over arms
                }  # fmt: skip
                started = time.monotonic()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                        await response.read()
                        version = response.headers.get("x-policy-version", "?")
                        load.done.append((started, time.monotonic() - started, response.status, version))
                        if response.status != 200:
                            load.errors.append(f"HTTP {response.status}: {(await response.text())[:200]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    load.done.append((started, time.monotonic() - started, 0, "?"))
                    load.errors.append(repr(exc))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def _admin(url: str, action: str) -> None:
    request = urllib.request.Request(f"{url}/admin/policy/{action}", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


async def _until(url: str, load: Load, since: float, wanted: str, timeout_s: float = 120) -> None:
    """Until a request started after ``since`` was answered by ``wanted``; else an error with the gateway's view."""
    deadline = time.monotonic() + timeout_s
    while wanted not in load.served_since(since):
        if time.monotonic() > deadline:
            from gateway.metrics import scrape

            swaps = {json.dumps(s.labels): s.value for s in scrape(url) if s.name == "bon_swaps_total"}
            with urllib.request.urlopen(f"{url}/admin/policy", timeout=10) as response:
                policy = response.read().decode()
            raise RuntimeError(f"version {wanted} was not served within {timeout_s} s; swaps {swaps}; {policy}; "
                               f"errors {load.errors[:3]}")  # fmt: skip
        await asyncio.sleep(0.1)


async def _changes(url: str, registry: Any, versions: list[str], load: Load, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rounds of changes, each to a version not served before; each window (kind, round, start, end)."""
    windows: list[dict[str, Any]] = []
    fresh = iter(versions)
    for r in range(args.rounds):
        for kind in CHANGES:
            await asyncio.sleep(args.steady_s)
            version = next(fresh)
            start = time.monotonic()
            if kind == "swap":
                registry.set_pointer("policy", "current", version, reason="bench swap")
                await _until(url, load, start, version)
            else:
                registry.set_pointer("policy", "canary", version, reason="bench canary")
                await _until(url, load, start, version)  # the canary answers its share
                await asyncio.to_thread(_admin, url, kind)
                if kind == "promote":
                    await _until(url, load, time.monotonic(), version)
            await asyncio.sleep(args.settle_s)
            windows.append({"kind": kind, "round": r, "start": start, "end": time.monotonic(), "version": version})
            print(f"[swap] round {r + 1}/{args.rounds}: {kind} {version} in {windows[-1]['end'] - start:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    await asyncio.sleep(args.steady_s)
    load.stop = True
    return windows


async def _bench(url: str, registry: Any, versions: list[str], args: argparse.Namespace) -> tuple[Load, list[dict[str, Any]]]:
    load = Load()
    driver = asyncio.create_task(_drive(url, load, args.concurrency, args.n, args.max_tokens))
    try:
        windows = await _changes(url, registry, versions, load, args)
    finally:
        load.stop = True
        await driver
    return load, windows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from versioning.registry import Registry

    models = Path(args.models)
    require_models(models)
    base = (models / "policy").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry")
        versions = [_publish(registry, base, seed) for seed in range(args.rounds * len(CHANGES))]  # before any load
        with vllm(base, Path(tmp), dtype="float32") as policy:  # float32 as served: the versions' probes check out
            settings = {
                "backends": [{"url": policy, "model": "policy"}],
                "scorer": {"kind": "local", "model_dir": str(models / "reward_model"), "threads": 1},
                "swap": {"registry_dir": str(registry.root), "poll_s": 0.5, "drain_s": 5},
                "canary": {"fraction": 0.5, "auto": False},
            }
            with gateway(settings) as url:
                load, windows = asyncio.run(_bench(url, registry, versions, args))
    return _report(load, windows, args)


def _report(load: Load, windows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def inside(start: float) -> dict[str, Any] | None:
        return next((w for w in windows if w["start"] <= start <= w["end"]), None)

    steady = [latency for start, latency, _, _ in load.done if inside(start) is None]
    steady_p99 = percentile(steady, 0.99)
    per_kind: dict[str, Any] = {}
    for kind in CHANGES:
        ratios, p99s, counts = [], [], []
        for w in (w for w in windows if w["kind"] == kind):
            latencies = [lat for start, lat, _, _ in load.done if w["start"] <= start <= w["end"]]
            p99s.append(percentile(latencies, 0.99) * 1000)
            ratios.append(percentile(latencies, 0.99) / steady_p99)
            counts.append(len(latencies))
        per_kind[kind] = {
            "window_p99_ms": [round(p, 1) for p in p99s], "requests": counts,
            "window_s": [round(w["end"] - w["start"], 1) for w in windows if w["kind"] == kind],
            "p99_over_steady": over_rounds(ratios),
        }  # fmt: skip
    statuses = Counter(str(status) for _, _, status, _ in load.done)
    non_2xx = sum(c for s, c in statuses.items() if not s.startswith("2"))
    report: dict[str, Any] = {
        "benchmark": "swap",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "n_candidates": args.n,
        "requests": len(load.done),
        "statuses": dict(statuses),
        "non_2xx": non_2xx,
        "errors_first": load.errors[:5],
        "steady_p99_ms": round(steady_p99 * 1000, 1),
        "steady_p50_ms": round(percentile(steady, 0.5) * 1000, 1),
        "changes": per_kind,
        "versions_served": dict(Counter(v for _, _, _, v in load.done)),
    }
    report["goals"] = [{"goal": "non-2xx == 0", "met": non_2xx == 0}] + [
        {"goal": f"{kind}: window p99 / steady p99 <= 2", "met": per_kind[kind]["p99_over_steady"]["mean"] <= 2.0}
        for kind in CHANGES
    ]
    json.dumps(report)  # fail here, not at the end of the run, if something is not JSON
    return report
