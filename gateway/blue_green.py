"""vLLM instances for full fine-tuned policy versions (the blue-green half of the hot-swap).

Knows how to start a vLLM OpenAI server on a version's model directory, on a free port of
the managed vLLM's host and with its settings (max model length, dtype, extra arguments),
named ``<served>@<version>`` like an adapter, and wait until it is healthy. Does not know
when to start or stop one, or how to verify or route to it: that is ``gateway.swap``.
A full version cannot be loaded into a running vLLM on CPU (vLLM's weight-update path
needs a GPU and a training-side process group), so each version gets its own server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from gateway.settings import ManagedVLLM
from gateway.vllm_process import VLLMProcess, VLLMStartError, free_port

__all__ = ["Instance", "Launcher", "VLLMStartError", "launcher"]


class Instance(Protocol):
    """A running server for one full version."""

    served_name: str
    """The name it serves the version under."""

    @property
    def url(self) -> str: ...

    def returncode(self) -> int | None: ...

    def stop(self) -> None: ...


Launcher = Callable[[Path, str], Awaitable[Instance]]
"""(model directory, version) → a started, healthy instance; raises ``VLLMStartError``."""


def launcher(settings: ManagedVLLM, log_dir: Path, cpu_binds: Sequence[str] = ()) -> Launcher:
    """Start each full version's vLLM like the managed one (host, length, dtype, extra args), on a free port;
    on CPU, pinned to the next of ``cpu_binds`` in turn (``swap.full_cpu_binds``)."""
    started = itertools.count()

    async def launch(model_dir: Path, version: str) -> Instance:
        port = free_port(settings.host)
        name = f"{settings.served_name}@{version}"
        env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_binds[next(started) % len(cpu_binds)]} if cpu_binds else {}
        process = VLLMProcess(
            model_dir, name, settings.host, port, max_model_len=settings.max_model_len, dtype=settings.dtype,
            extra_args=settings.extra_args, log_path=log_dir / f"vllm-{version}-{port}.log", lora=False, env=env,
        )  # fmt: skip
        try:
            await asyncio.to_thread(process.start)
            await process.wait_healthy_async(settings.startup_s)
        except BaseException:  # a failed start or a cancelled swap (shutdown) leaves no server behind
            await asyncio.shield(asyncio.to_thread(process.stop))
            raise
        return process

    return launch
