"""The project's benchmarks; each prints one JSON object as its last line.

  overhead   what the gateway adds in front of a mock backend (0 ms and 50 ms), N=1, scoring off,
             at 1 and 32 concurrent requests; baseline = the same requests sent to the backend

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
from collections.abc import Iterator
from contextlib import contextmanager
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


def _wait_http(url: str, timeout_s: float = 120) -> None:
    import urllib.error
    import urllib.request

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
        _wait_http(health)
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
        config.write_text(yaml.safe_dump({**settings, "port": port, "models_preset": None}))
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


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for delay in args.delays:
        with mock_backend(delay) as backend:
            settings = {"backends": [{"url": backend, "model": "policy"}], "scoring_enabled": False, "n_candidates": 1}
            with gateway(settings) as gw:
                for concurrency in args.concurrency:
                    targets = {"direct": (backend, {**BODY, "model": "policy"}), "gateway": (gw, BODY)}
                    for url, body in targets.values():  # warm-up: connections, caches
                        asyncio.run(load(url, body, concurrency * 5, concurrency))
                    rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
                    for r in range(args.rounds):
                        order = ["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]
                        for name in order:
                            url, body = targets[name]
                            latencies, wall = asyncio.run(load(url, body, args.requests, concurrency))
                            rounds[name].append(
                                {
                                    "p50": percentile(latencies, 0.5),
                                    "p99": percentile(latencies, 0.99),
                                    "rps": len(latencies) / wall,
                                }
                            )
                    d, g = rounds["direct"], rounds["gateway"]
                    per_round = list(zip(d, g, strict=True))
                    results.append(
                        {
                            "delay_ms": delay,
                            "concurrency": concurrency,
                            "direct_p50_ms": round(statistics.median(x["p50"] for x in d) * 1000, 3),
                            "gateway_p50_ms": round(statistics.median(x["p50"] for x in g) * 1000, 3),
                            "added_p50_ms": mean_ci([(b["p50"] - a["p50"]) * 1000 for a, b in per_round]),
                            "added_p99_ms": mean_ci([(b["p99"] - a["p99"]) * 1000 for a, b in per_round]),
                            "p50_ratio": mean_ci([b["p50"] / a["p50"] for a, b in per_round]),
                            "p99_ratio": mean_ci([b["p99"] / a["p99"] for a, b in per_round]),
                            "direct_rps": round(statistics.median(x["rps"] for x in d), 1),
                            "gateway_rps": round(statistics.median(x["rps"] for x in g), 1),
                        }
                    )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead", help="gateway overhead in front of a mock backend")
    over.add_argument("--rounds", type=int, default=6)
    over.add_argument("--requests", type=int, default=300, help="requests per round and target")
    over.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    over.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")
    args = parser.parse_args(argv)
    report = overhead(args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
