"""Where a round's process runs on a CPU machine: its CPUs (affinity) and torch's threads.

Knows two measured ways a round beside a busy vLLM (one machine; a node where the pod has no
CPU limit) loses its time, and what avoids each:
- Loading torch pins the loading thread to each CPU it may use in turn (MKL counts the cores:
  ``MKL_Read_ThreadENV_Count_Cores`` under ``at::init_num_threads``). On the core that vLLM's
  pinned CPU worker keeps busy, single pins waited 10.7 and 56.9 s and ``import torch`` took
  51-217 s of a round. A round restricted to the other cores (``trainer.cpus``, applied here
  before torch loads) never goes there.
- torch's default threads are one per core; each parallel region waits for all of them, so a
  thread on vLLM's core makes every step wait for vLLM: DPO steps took 31-35 s with 2 threads
  and 0.7-1.5 s with 1 (``trainer.threads``; with ``cpus`` it defaults to one per CPU).

Does not choose the CPUs: which ones vLLM leaves free is the deployment's to say (vLLM's
``VLLM_CPU_OMP_THREADS_BIND`` on CPU; Kubernetes' CPU manager on a node).
"""

from __future__ import annotations

import os


class CpuError(ValueError):
    """The settings name CPUs this process may not run on."""


def apply(cpus: list[int] | None, threads: int | None) -> None:
    """Restrict this process to ``cpus`` (None: leave its affinity) and set torch's threads to ``threads`` (None: one per
    CPU in ``cpus``, or torch's default). Call before torch loads for ``cpus`` to keep torch's own start off the others."""
    if cpus is not None:
        allowed = os.sched_getaffinity(0)
        if missing := sorted(set(cpus) - allowed):
            raise CpuError(f"trainer.cpus names CPU {missing[0]}, which this process may not use (it may use "
                           f"{', '.join(map(str, sorted(allowed)))})")  # fmt: skip
        os.sched_setaffinity(0, cpus)
    count = threads if threads is not None else (len(set(cpus)) if cpus is not None else None)
    if count is not None:
        import torch

        torch.set_num_threads(count)
