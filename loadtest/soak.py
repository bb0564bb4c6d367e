"""``bench soak``: the gateway under steady mixed load for ``--minutes`` (10 by default) on real vLLM and the real
reward model, the log on (SQLite), thumbs on a share of answers and a share of requests invalid on purpose (their
400s are expected). Samples the gateway's resident memory and open file descriptors every ``--sample-s`` and
compares the last third of the samples after warm-up with the first third (medians, so one sample taken mid-batch
does not decide). Goals: RSS growth <= 5%, descriptors flat (no more than a few more), no unexpected status.
Not a comparison: a leak shows as growth against the process's own warm state."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.servers import gateway_process, require_models, vllm
from loadtest.stats import percentile

HELP = "10 minutes of steady mixed load: gateway memory and descriptors flat, no error"

KINDS = ("n1", "n4", "n4_stream", "n1_stream", "invalid")
"""The request mix, in turn: best-of-1 and best-of-4, plain and streamed, and one invalid request in five."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/default", help="the toy models (policy/, reward_model/)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="excluded from the growth figures")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--thumbs-every", type=int, default=5, help="a thumb on every k-th answer")


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    thumbs: int = 0
    unexpected: list[str] = field(default_factory=list)


def _body(kind: str, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "toy-bon", "messages": [{"role": "user", "content": f"What is {i % 9 + 1} plus {i % 7 + 2}?"}],
        "max_tokens": 32, "n_candidates": 4 if kind.startswith("n4") else 1,
    }  # fmt: skip
    if kind.endswith("stream"):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if kind == "invalid":
        body["temperature"] = "hot"  # a 400 naming the field
    return body


async def _one(session: aiohttp.ClientSession, url: str, kind: str, i: int, tally: Tally, thumbs_every: int) -> None:
    started = time.perf_counter()
    expected = 400 if kind == "invalid" else 200
    try:
        async with session.post(f"{url}/v1/chat/completions", json=_body(kind, i)) as response:
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.statuses[exc.__class__.__name__] += 1
        tally.unexpected.append(f"{kind}: {exc!r}")
        return
    tally.latencies[kind].append(time.perf_counter() - started)
    tally.statuses[str(status)] += 1
    if status != expected or (kind.endswith("stream") and "data: [DONE]" not in text):
        tally.unexpected.append(f"{kind}: HTTP {status}: {text[:200]}")
        return
    if status == 200 and not kind.endswith("stream") and i % thumbs_every == 0:
        completion = json.loads(text)["id"]
        async with session.post(f"{url}/v1/feedback", json={"completion_id": completion, "thumb": "up"}) as thumb:
            if thumb.status != 200:
                tally.unexpected.append(f"feedback: HTTP {thumb.status}")
            tally.thumbs += 1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _soak(url: str, pid: int, args: argparse.Namespace) -> tuple[Tally, list[dict[str, float]]]:
    tally = Tally()
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + args.minutes * 60
    counter = itertools.count()
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                await _one(session, url, KINDS[i % len(KINDS)], i, tally, args.thumbs_every)

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append({"t_s": time.monotonic() - started, "rss_mb": _rss_mb(pid), "fds": _fds(pid),
                                "requests": sum(tally.statuses.values())})  # fmt: skip
                print(f"[soak] {samples[-1]}", file=sys.stderr, flush=True)
                await asyncio.sleep(args.sample_s)

        await asyncio.gather(sampler(), *(worker() for _ in range(args.concurrency)))
    return tally, samples


def _thirds(samples: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Medians of the first and the last third of ``samples`` (at least one each)."""
    third = max(1, len(samples) // 3)
    return statistics.median(s[key] for s in samples[:third]), statistics.median(s[key] for s in samples[-third:])


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = Path(args.models)
    require_models(models)
    with tempfile.TemporaryDirectory() as tmp, vllm(models / "policy", Path(tmp)) as policy:
        settings = {
            "backends": [{"url": policy, "model": "policy"}],
            "scorer": {"kind": "local", "model_dir": str(models / "reward_model"), "threads": 1},
            "swap": {"registry_dir": str(Path(tmp) / "registry")},
            "feedback": {"per_minute": 100_000, "burst": 1000},  # a soak looks for leaks, not for the rate limit
        }
        with gateway_process(settings) as (url, pid):
            tally, samples = asyncio.run(_soak(url, pid, args))
    warm = [s for s in samples if s["t_s"] >= args.warmup_minutes * 60]
    rss_first, rss_last = _thirds(warm, "rss_mb")
    fds_first, fds_last = _thirds(warm, "fds")
    growth = rss_last / rss_first - 1
    report: dict[str, Any] = {
        "benchmark": "soak",
        "cpu_count": os.cpu_count(),
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "concurrency": args.concurrency,
        "requests": sum(tally.statuses.values()),
        "statuses": dict(tally.statuses),
        "thumbs": tally.thumbs,
        "unexpected": len(tally.unexpected),
        "unexpected_first": tally.unexpected[:5],
        "latency_ms": {
            k: {"p50": round(percentile(v, 0.5) * 1000, 1), "p99": round(percentile(v, 0.99) * 1000, 1), "count": len(v)}
            for k, v in tally.latencies.items()
            if v
        },
        "rss_mb": {"warm_first_third": round(rss_first, 1), "last_third": round(rss_last, 1), "growth": round(growth, 4)},
        "fds": {"warm_first_third": fds_first, "last_third": fds_last},
        "samples": samples,
    }
    report["goals"] = [
        {"goal": "RSS growth after warm-up <= 5%", "met": growth <= 0.05},
        {"goal": "open descriptors flat (last third <= first third + 4)", "met": fds_last <= fds_first + 4},
        {"goal": "no unexpected status", "met": not tally.unexpected},
    ]
    return report
