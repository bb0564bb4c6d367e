"""``bench workers``: the same gateway config served by 1 and by 2 worker processes (``workers: N``), in front of a
0 ms mock backend, N=1, scoring off, the log on (SQLite in a temporary directory); baseline = the same requests sent
straight to the backend, all three interleaved. Reports throughput, added p50/p99 and CPU per request (the whole
process tree: the parent and its workers) at each concurrency, and the 2-worker throughput over the 1-worker one
per round, with its interval. What more workers can give is bounded by the cores the load generator and the
backend leave free; ``cpu_count`` is in the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loadtest.servers import cpu_seconds, gateway_process, mock_backend
from loadtest.stats import over_rounds
from loadtest.traffic import BODY, compare, summary

HELP = "1 vs 2 gateway worker processes on one port (mock backend, log on)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--log", choices=["on", "off"], default="on", help="the request log (SQLite)")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants (a gateway's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return cpu_seconds(pid) + sum(tree_cpu_seconds(k) for k in kids)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    with mock_backend(0.0) as backend:
        settings: dict[str, Any] = {
            "backends": [{"url": backend, "model": "policy"}], "scoring_enabled": False, "n_candidates": 1,
            "swap": {"enabled": False}, "store": {"enabled": args.log == "on"},
        }  # fmt: skip
        with gateway_process(settings) as (one, one_pid), gateway_process({**settings, "workers": 2}) as (two, two_pid):
            for concurrency in args.concurrency:
                targets = {"direct": (backend, {**BODY, "model": "policy"}), "workers_1": (one, BODY), "workers_2": (two, BODY)}
                cpu = {"workers_1": lambda: tree_cpu_seconds(one_pid), "workers_2": lambda: tree_cpu_seconds(two_pid)}
                rounds = compare(targets, args.rounds, args.requests, concurrency, cpu)
                row: dict[str, Any] = {"concurrency": concurrency}
                for name in ("workers_1", "workers_2"):
                    row[name] = summary(rounds["direct"], rounds[name], ("direct", name))
                    row[name]["cpu_us_per_request"] = over_rounds([r["cpu_us"] for r in rounds[name]])
                per_round = list(zip(rounds["workers_1"], rounds["workers_2"], strict=True))
                row["rps_ratio_2_over_1"] = over_rounds([b["rps"] / a["rps"] for a, b in per_round])
                row["p50_ratio_2_over_1"] = over_rounds([b["p50"] / a["p50"] for a, b in per_round])
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "benchmark": "workers",
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "log": args.log,
        "results": results,
    }
