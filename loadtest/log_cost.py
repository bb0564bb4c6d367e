"""``bench logging``: the log's cost on the request path: the same gateway (mock backend, N=1) with the log on
(SQLite in a temporary directory, or ``--db``) and off, interleaved."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gateway.metrics import sample
from loadtest.servers import gateway, mock_backend
from loadtest.traffic import BODY, compare, summary

HELP = "the log's cost: the same gateway with the log on and off"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="requests per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")
    parser.add_argument("--db", default=None, help="log to this database (e.g. PostgreSQL) instead of a temporary SQLite file")


def run(args: argparse.Namespace) -> dict[str, Any]:
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
                logged = sum(sample(on, m) or 0.0 for m in ("bon_log_records_written_total", "bon_log_records_spooled_total"))
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
