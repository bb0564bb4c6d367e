"""``bench overhead``: what the gateway adds in front of a mock backend (0 ms and 50 ms), N=1, scoring and the log
off, at 1 and 32 concurrent requests; baseline = the same requests sent straight to the backend."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from loadtest.servers import gateway, mock_backend
from loadtest.traffic import BODY, compare, summary

HELP = "gateway overhead in front of a mock backend"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="requests per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
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
