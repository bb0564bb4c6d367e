"""A round's CPUs and torch threads (``trainer.cpu``): applied in a fresh process, as ``python -m trainer run`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer.cpu import CpuError, apply

PROBE = """
import json, os, sys
from trainer import cpu
cpu.apply(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
import torch
print(json.dumps({"cpus": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}))
"""


def _applied(cpus: list[int] | None, threads: int | None) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cpus), json.dumps(threads)],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_cpus_pin_the_round_and_give_torch_one_thread_each() -> None:
    last = max(os.sched_getaffinity(0))
    assert _applied([last], None) == {"cpus": [last], "threads": 1}


def test_threads_alone_leave_the_affinity_and_set_torch_s_threads() -> None:
    assert _applied(None, 3) == {"cpus": sorted(os.sched_getaffinity(0)), "threads": 3}


def test_a_cpu_the_process_may_not_use_is_named() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(CpuError, match="names CPU 4096"):
        apply([0, 4096], None)
    assert os.sched_getaffinity(0) == before
