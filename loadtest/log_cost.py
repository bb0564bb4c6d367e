"""``bench logging``: the log's cost on the request path: the same gateway (mock backend, N=1) with the log off, on
with the writer thread, and on with the writer process (``store.writer: process``), interleaved; the log in SQLite
in a temporary directory, or ``--db``. Per row: latency ratios and the throughput ratio (on / off) per round."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gateway.metrics import sample
from loadtest.servers import gateway, mock_backend
from loadtest.stats import over_rounds
from loadtest.traffic import BODY, compare, summary

HELP = "the log's cost: the same gateway with the log on and off"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="requests per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 50.0], help="backend delays in ms")
    parser.add_argument("--db", default=None, help="log to this database (e.g. PostgreSQL) instead of a temporary SQLite file")


def _rps_ratio(off: list[dict[str, float]], on: list[dict[str, float]]) -> dict[str, Any]:
    """Throughput with the log over without it, per round (interleaved), with its interval."""
    return over_rounds([b["rps"] / a["rps"] for a, b in zip(off, on, strict=True)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The same gateway config with the log on (SQLite, or ``--db``) and off, in front of one backend."""
    results = []
    for delay in args.delays:
        with mock_backend(delay) as backend:
            base = {"backends": [{"url": backend, "model": "policy"}], "scoring_enabled": False, "n_candidates": 1}
            on_store: dict[str, Any] = {"enabled": True}
            if args.db:
                on_store |= {"url": args.db, "id_secret": "bench-logging-secret"}
            with (
                gateway(base | {"store": {"enabled": False}}) as off,
                gateway(base | {"store": on_store}) as on,
                gateway(base | {"store": on_store | {"writer": "process"}}) as on_process,
            ):
                for concurrency in args.concurrency:
                    targets = {"off": (off, BODY), "on": (on, BODY), "process": (on_process, BODY)}
                    rounds = compare(targets, args.rounds, args.requests, concurrency)
                    row: dict[str, Any] = {"delay_ms": delay, "concurrency": concurrency}
                    row |= summary(rounds["off"], rounds["on"], ("log_off", "log_on"))
                    row["rps_ratio"] = _rps_ratio(rounds["off"], rounds["on"])
                    row["process"] = summary(rounds["off"], rounds["process"], ("log_off", "log_on"))
                    row["process"]["rps_ratio"] = _rps_ratio(rounds["off"], rounds["process"])
                    results.append(row)
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
                for url in (on, on_process):
                    written = ("bon_log_records_written_total", "bon_log_records_spooled_total")
                    logged = sum(sample(url, m) or 0.0 for m in written)
                    if logged == 0:
                        raise RuntimeError("a log-on gateway logged nothing: the benchmark would compare two identical paths")
    goals = []
    for r in results:
        where = f"{r['delay_ms']} ms, c={r['concurrency']}"
        for writer, row in (("thread", r), ("process", r["process"])):
            goals.append({"goal": f"{writer} writer: p50_ratio <= 1.02 at {where}", "met": row["p50_ratio"]["mean"] <= 1.02})
            if r["delay_ms"] == 0 and r["concurrency"] > 1:  # saturation: throughput kept
                goals.append({"goal": f"{writer} writer: rps_ratio >= 0.95 at {where}", "met": row["rps_ratio"]["mean"] >= 0.95})
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
