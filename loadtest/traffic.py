"""Closed-loop HTTP load on OpenAI-style chat endpoints, interleaved between targets over rounds.

``compare`` sends the same number of requests at the same concurrency to each target in
turn, alternating the order every round (these machines are noisy), and ``summary`` turns
two targets' rounds into per-round differences and ratios with their intervals.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from loadtest.stats import over_rounds, percentile

BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 16}


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
    targets: dict[str, tuple[str, dict[str, Any]]],
    rounds: int,
    requests: int,
    concurrency: int,
    cpu: dict[str, Callable[[], float]] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """p50, p99 and throughput per round of each target (a name → (url, body)); the order alternates per round.
    ``cpu``: per target, its server's CPU seconds so far; each round then also has ``cpu_us`` per request."""
    for url, body in targets.values():  # warm-up: connections, caches
        asyncio.run(load(url, body, concurrency * 5, concurrency))
    out: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            url, body = targets[name]
            clock = (cpu or {}).get(name)
            before = clock() if clock is not None else 0.0
            latencies, wall = asyncio.run(load(url, body, requests, concurrency))
            stats = {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "rps": len(latencies) / wall}
            if clock is not None:
                stats["cpu_us"] = (clock() - before) / len(latencies) * 1e6
            out[name].append(stats)
    return out


def summary(base: list[dict[str, float]], treat: list[dict[str, float]], names: tuple[str, str]) -> dict[str, Any]:
    """Medians of each, and per-round differences and ratios (treatment over baseline) with 95% intervals."""
    per_round = list(zip(base, treat, strict=True))
    return {
        f"{names[0]}_p50_ms": round(statistics.median(x["p50"] for x in base) * 1000, 3),
        f"{names[1]}_p50_ms": round(statistics.median(x["p50"] for x in treat) * 1000, 3),
        "added_p50_ms": over_rounds([(b["p50"] - a["p50"]) * 1000 for a, b in per_round]),
        "added_p99_ms": over_rounds([(b["p99"] - a["p99"]) * 1000 for a, b in per_round]),
        "p50_ratio": over_rounds([b["p50"] / a["p50"] for a, b in per_round]),
        "p99_ratio": over_rounds([b["p99"] / a["p99"] for a, b in per_round]),
        f"{names[0]}_rps": round(statistics.median(x["rps"] for x in base), 1),
        f"{names[1]}_rps": round(statistics.median(x["rps"] for x in treat), 1),
    }
