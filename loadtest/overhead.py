"""``bench overhead``: what the gateway adds in front of a mock backend (0 ms and 50 ms), N=1, scoring and the log
off, at 1, 8, 32 and 128 concurrent requests; baseline = the same requests sent straight to the backend; beside it,
the floor: ``loadtest.proxy``, a minimal aiohttp pass-through, in the same rounds. Also the CPU each spends per
request (its process's CPU time over the requests it served) and the throughput at saturation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from loadtest.servers import cpu_seconds, gateway_process, mock_backend, proxy
from loadtest.stats import over_rounds
from loadtest.traffic import BODY, compare, summary

HELP = "gateway overhead in front of a mock backend"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="requests per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for delay in args.delays:
        with mock_backend(delay) as backend:
            settings = {
                "backends": [{"url": backend, "model": "policy"}],
                "scoring_enabled": False,
                "n_candidates": 1,
                "store": {"enabled": False},  # the log's own cost: `bench logging`
            }
            with gateway_process(settings) as (gw, gw_pid), proxy(backend) as (px, px_pid):
                for concurrency in args.concurrency:
                    targets = {
                        "direct": (backend, {**BODY, "model": "policy"}),
                        "proxy": (px, {**BODY, "model": "policy"}),
                        "gateway": (gw, BODY),
                    }
                    cpu = {"proxy": lambda: cpu_seconds(px_pid), "gateway": lambda: cpu_seconds(gw_pid)}
                    rounds = compare(targets, args.rounds, args.requests, concurrency, cpu)
                    row: dict[str, Any] = {"delay_ms": delay, "concurrency": concurrency}
                    row |= summary(rounds["direct"], rounds["gateway"], ("direct", "gateway"))
                    floor = summary(rounds["direct"], rounds["proxy"], ("direct", "proxy"))
                    row["proxy"] = {k: floor[k] for k in ("proxy_p50_ms", "added_p50_ms", "added_p99_ms", "proxy_rps")}
                    per_round = list(zip(rounds["proxy"], rounds["gateway"], strict=True))
                    row["cpu_us_per_request"] = {
                        "gateway": over_rounds([g["cpu_us"] for g in rounds["gateway"]]),
                        "proxy": over_rounds([p["cpu_us"] for p in rounds["proxy"]]),
                        "ratio": over_rounds([g["cpu_us"] / p["cpu_us"] for p, g in per_round]),
                    }
                    row["added_vs_proxy"] = {  # per round: the gateway's added latency over the proxy's
                        "p50_ratio": over_rounds([_added(g, d, p, "p50") for d, p, g in zip(*rounds.values(), strict=True)]),
                        "p99_ratio": over_rounds([_added(g, d, p, "p99") for d, p, g in zip(*rounds.values(), strict=True)]),
                    }
                    results.append(row)
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    goals = []
    for row in results:
        c = row["concurrency"]
        if row["delay_ms"] == 0:  # issue 23's goals, each judged on its mean over the rounds
            goals.append(
                {"goal": f"CPU per request <= 1.2x the proxy's, c={c}", "met": row["cpu_us_per_request"]["ratio"]["mean"] <= 1.2}
            )
            goals.append(
                {"goal": f"added p50 <= 1.5x the proxy's, c={c}", "met": row["added_vs_proxy"]["p50_ratio"]["mean"] <= 1.5}
            )
            goals.append(
                {"goal": f"added p99 <= 2x the proxy's, c={c}", "met": row["added_vs_proxy"]["p99_ratio"]["mean"] <= 2.0}
            )
            if c == 1:
                goals.append({"goal": "added p50 <= 3 ms at c=1", "met": row["added_p50_ms"]["mean"] <= 3.0})
        else:
            goals.append({"goal": f"p50_ratio <= 1.05 at {row['delay_ms']} ms, c={c}", "met": row["p50_ratio"]["mean"] <= 1.05})
            goals.append({"goal": f"p99_ratio <= 1.15 at {row['delay_ms']} ms, c={c}", "met": row["p99_ratio"]["mean"] <= 1.15})
    return {
        "benchmark": "overhead",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "results": results,
        "goals": goals,
    }


def _added(gateway: dict[str, float], direct: dict[str, float], proxy: dict[str, float], key: str) -> float:
    """The gateway's added latency over the proxy's in one round (each over the direct baseline), floored at 50 us."""
    return max(gateway[key] - direct[key], 5e-5) / max(proxy[key] - direct[key], 5e-5)
