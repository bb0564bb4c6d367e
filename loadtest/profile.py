"""``bench profile``: where the gateway's CPU goes on the N=1 path under load, sampled by py-spy.

The gateway runs as ``bench overhead`` runs it (mock backend at 0 ms, N=1, scoring and the
log off); closed-loop load at ``--concurrency`` while ``py-spy record`` samples the process
(native frames off, idle off: CPU only). Writes the flame graph (SVG) and reports the share
of samples per package or module (the frame nearest the leaf that belongs to a named
package; the rest is ``other``), so a change's effect can be read in the same terms before
and after. py-spy needs ptrace on the gateway's process (root, or
``kernel.yama.ptrace_scope`` 0). Does not judge a goal: ``bench overhead`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.servers import cpu_seconds, gateway_process, mock_backend
from loadtest.traffic import BODY, load

HELP = "where the gateway's CPU goes on the N=1 path (py-spy flame graph and shares by package)"
PACKAGES = (
    "gateway", "starlette", "fastapi", "pydantic", "pydantic_core", "uvicorn", "aiohttp", "prometheus_client",
    "structlog", "json", "asyncio", "uvloop", "httptools", "yarl", "multidict", "anyio", "logging", "email",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("docs/profile-n1.svg"), help="the flame graph (SVG)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"backends": [{"url": "", "model": "policy"}], "scoring_enabled": False, "n_candidates": 1,
                "store": {"enabled": False}}  # fmt: skip
    with mock_backend(0.0) as backend:
        settings["backends"] = [{"url": backend, "model": "policy"}]
        with gateway_process(settings) as (url, pid):
            asyncio.run(load(url, BODY, 2_000, args.concurrency))  # warm-up
            collapsed = Path(tempfile.mkdtemp(prefix="profile-")) / "stacks.txt"  # the shares are read from it
            commands = [
                [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", fmt, "--output", str(path),
                 "--nonblocking"]
                for fmt, path in (("raw", collapsed), ("flamegraph", args.out))
            ]  # fmt: skip
            # One sampler at a time: the two formats come from two halves of the load.
            shares: collections.Counter[str] = collections.Counter()
            cpu_before, started, served = cpu_seconds(pid), time.perf_counter(), 0
            for command in commands:
                spy_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # attached
                latencies, _ = asyncio.run(load(url, BODY, args.requests // 2, args.concurrency))
                served += len(latencies)
                spy_process.send_signal(2)  # SIGINT: py-spy writes its output and exits
                _, err = spy_process.communicate(timeout=60)
                if spy_process.returncode not in (0, -2):
                    raise RuntimeError(f"py-spy failed ({spy_process.returncode}): {err.decode()[-500:]}")
            wall = time.perf_counter() - started
            cpu_us = (cpu_seconds(pid) - cpu_before) / served * 1e6
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        shares[_owner(stack)] += samples
    return {
        "benchmark": "profile", "concurrency": args.concurrency, "requests": served, "rps": round(served / wall, 1),
        "cpu_us_per_request": round(cpu_us, 1), "samples": total,
        "share_by_package": {k: round(v / total, 4) for k, v in shares.most_common()} if total else {},
        "flame_graph": str(args.out),
    }  # fmt: skip


def _owner(stack: str) -> str:
    """The named package of the frame nearest the leaf (``gateway.routes``-level for our own code)."""
    for frame in reversed(stack.split(";")):
        # a frame reads "function (path/to/module.py:line)"
        path = frame.rpartition("(")[2].rpartition(":")[0]
        parts = Path(path).with_suffix("").parts
        if "site-packages" in parts:
            parts = parts[parts.index("site-packages") + 1 :]
        elif "gateway" in parts:
            parts = parts[parts.index("gateway") :]
        elif "python3.11" in parts:
            parts = parts[parts.index("python3.11") + 1 :]
        if parts and parts[0] in PACKAGES:
            return ".".join(parts[:2]) if parts[0] == "gateway" else parts[0]
    return "other"
