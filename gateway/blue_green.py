"""vLLM instances for full fine-tuned policy versions (the blue-green half of the hot-swap).

Knows how to start a vLLM OpenAI server on a version's model directory, on a free port of
the managed vLLM's host and with its settings (max model length, dtype, extra arguments),
named ``<served>@<version>`` like an adapter, and wait until it is healthy; ``Instances``
keeps one per version and notices the ones that died. Does not know when to start or stop
one, or how to verify or route to it: that is ``gateway.swap``.
A full version cannot be loaded into a running vLLM on CPU (vLLM's weight-update path
needs a GPU and a training-side process group), so each version gets its own server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from gateway.settings import ManagedVLLM
from gateway.vllm_process import VLLMProcess, VLLMStartError, free_port

__all__ = ["Instance", "Instances", "Launcher", "VLLMStartError", "launcher"]
log = logging.getLogger("gateway.blue_green")


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
            extra_args=settings.vllm_args(), log_path=log_dir / f"vllm-{version}-{port}.log", lora=False, env=env,
        )  # fmt: skip
        try:
            await asyncio.to_thread(process.start)
            await process.wait_healthy_async(settings.startup_s)
        except BaseException:  # a failed start or a cancelled swap (shutdown) leaves no server behind
            await asyncio.shield(asyncio.to_thread(process.stop))
            raise
        return process

    return launch


class Instances:
    """The running instances of full versions (routed or draining), one per version, started by ``launch``."""

    def __init__(self, launch: Launcher, on_stopped: Callable[[str], None] = lambda url: None) -> None:
        """``on_stopped``: told each stopped instance's URL (its circuit breaker and metric series go with it)."""
        self._launch = launch
        self._on_stopped = on_stopped
        self._running: dict[str, Instance] = {}

    def __contains__(self, version: str) -> bool:
        return version in self._running

    async def ensure(self, version: str, model_dir: Path) -> Instance:
        """The version's instance: the running one (a draining version routed again), else a new one."""
        instance = self._running.get(version)
        if instance is None or instance.returncode() is not None:
            log.warning("starting a vLLM instance for full version %s (blue-green)", version)
            instance = await self._launch(model_dir, version)
            self._running[version] = instance
        return instance

    def exited(self) -> list[tuple[str, int]]:
        """(version, exit code) of each instance that died."""
        return [(v, code) for v, instance in self._running.items() if (code := instance.returncode()) is not None]

    async def stop(self, version: str) -> None:
        instance = self._running.pop(version, None)
        if instance is not None:
            log.warning("stopping the vLLM instance of full version %s at %s", version, instance.url)
            await asyncio.to_thread(instance.stop)  # also when it exited: its engine-core child may still be alive
            self._on_stopped(instance.url)

    async def stop_all(self) -> None:
        for version in list(self._running):
            await self.stop(version)
