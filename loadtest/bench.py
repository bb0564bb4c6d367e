"""The project's benchmarks; each prints one JSON object as its last line.

  overhead   what the gateway adds in front of a mock backend (0 ms and 50 ms), N=1, scoring off, beside a
             minimal aiohttp proxy (loadtest/proxy.py) and with each one's CPU per request,
             at 1, 8, 32 and 128 concurrent requests; baseline = the same requests sent to the backend
  logging    the log's cost: the same gateway (mock backend, N=1) with the log on and off
  bon        best-of-N through the gateway (real vLLM + the real reward model) for N = 1, 2, 4, 8;
             baseline = the same requests sent straight to that vLLM (one request with n=N, no scoring)
  train      one DPO round's training on the default models with the reference log-probs cached
             (computed once per pair; cold: this round's pairs are new; warm: seen in an earlier round);
             baseline = recomputed by TRL at every step (``dpo.cache_reference: false``)
  formats    serving a version as a LoRA adapter (on the base's vLLM) vs as a full model (its own vLLM,
             blue-green): request latency at N=4 (same requests, same token counts), base = the base model on
             the LoRA-enabled vLLM; and the swap itself: adapter load + first request vs vLLM start + first request

  scoring    the reward model (the gateway's scorer, on GPU when there is one) scoring N candidates in one batch;
             baseline = the same N scored one at a time (N passes)

  workers    the same gateway with 1 and with 2 worker processes on one port (mock backend, N=1, the log on):
             throughput, added latency and CPU per request; baseline = the backend itself

  swap       steady load (N=4, real vLLM) while a version is hot-swapped, a canary promoted and one rolled back:
             non-2xx answers and each change window's p99 over the steady p99

  soak       10 minutes of steady mixed load on real vLLM and the reward model (N=1 and 4, streamed or not,
             thumbs, invalid requests): the gateway's memory and descriptors after warm-up, unexpected statuses

  prune      early-pruned best-of-N (``selection: prune``) vs plain best-of-N on one gateway (real models), N = 4, 8,
             16: tokens generated, TTFT and the answers' gold reward; baseline = plain best-of-N

  adaptive   adaptive N vs a fixed N (real models): candidates generated and the answers' gold reward (baseline =
             the cap for every request), then p99 at twice the load with the fixed N's p99 as a latency budget

  profile    where the gateway's CPU goes on the N=1 path under load: a py-spy flame graph (docs/) and the
             share of samples by package (not a comparison: the figures ``overhead`` judges come from there)

One module per benchmark (``overhead``, ``log_cost``, ``bon``, ``train``, ``formats``, ``scoring``, ``workers``,
``swap``, ``soak``, ``prune``, ``adaptive``, ``profile``: ``HELP``, ``add_arguments``, ``run``) on shared helpers
(``stats``: percentiles and the intervals, ``servers``: the mock backend and gateway processes, ``traffic``:
interleaved HTTP load). Baseline and gateway run in the same process tree and are interleaved over several rounds
(the order alternates per round), because these machines are noisy; each ratio is reported
with a 95% interval over rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import ModuleType

from loadtest import adaptive, bon, formats, log_cost, overhead, profile, prune, scoring, soak, swap, train, workers

BENCHMARKS: dict[str, ModuleType] = {
    "overhead": overhead, "logging": log_cost, "bon": bon, "train": train, "formats": formats, "scoring": scoring,
    "workers": workers, "swap": swap, "soak": soak, "prune": prune, "adaptive": adaptive,
    "profile": profile,
}  # fmt: skip
"""Each benchmark's module: ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict`` (the report)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    args = parser.parse_args(argv)
    report = BENCHMARKS[args.command].run(args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
