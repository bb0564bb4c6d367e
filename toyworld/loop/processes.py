"""The processes an evaluate-loop run starts and stops: vLLM, its gateway and its training rounds,
the last two with the gold reward sealed off (``toyworld.loop.sealed``), and how SIGTERM stops them.

Knows command lines, readiness, logs, time limits and one-line errors (``LoopError``); not what
a run does with the processes (``toyworld.loop.runner``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

T = TypeVar("T")


class LoopError(Exception):
    """A run could not go on (the gateway did not start or swap, a round failed); one line for the user."""


def start_vllm(managed: dict[str, Any], log_path: Path, log: Callable[[str], None]) -> Any:
    """A vLLM server like the config's managed one, on a free port, healthy (a ``VLLMProcess``)."""
    from gateway.settings import ManagedVLLM
    from gateway.vllm_process import VLLMProcess, free_port

    m = ManagedVLLM(**{**managed, "enabled": True})
    vllm = VLLMProcess(
        m.model_dir, m.served_name, m.host, free_port(), max_model_len=m.max_model_len, max_lora_rank=m.max_lora_rank,
        max_loras=m.max_loras, dtype=m.dtype, extra_args=m.vllm_args(), log_path=log_path, nice=m.nice,
    )  # fmt: skip
    log(f"starting vLLM on {m.model_dir} (log: {vllm.log_path}) ...")
    vllm.start()
    try:
        vllm.wait_healthy(m.startup_s)
    except BaseException:  # not healthy in time, or SIGTERM while waiting: not left behind
        vllm.stop()
        raise
    return vllm


class GatewayProcess:
    """A gateway process (``python -m gateway serve``) started with the gold reward sealed off."""

    def __init__(self, url: str, config: Path, log_path: Path) -> None:
        self.url = url
        self.config = config
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "toyworld.loop.sealed", "gateway", "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()

    def exited(self) -> bool:
        return self._proc is None or self._proc.poll() is not None

    async def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self._proc.wait, 60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)


async def start_gateway(session: aiohttp.ClientSession, run_dir: Path, config: Path, timeout_s: float) -> GatewayProcess:
    """The run's gateway on its config's port, ready (``/ready``); stopped again if it is not ready in time."""
    cfg = yaml.safe_load(config.read_text())
    gateway = GatewayProcess(f"http://127.0.0.1:{cfg['port']}", config, run_dir / "gateway.log")
    gateway.start()

    async def ready() -> bool:
        if gateway.exited():
            raise LoopError(f"the gateway exited while starting; see {gateway.log_path}")
        with suppress(aiohttp.ClientError):
            async with session.get(f"{gateway.url}/ready") as response:
                return response.status == 200
        return False

    deadline = time.monotonic() + timeout_s
    try:
        while not await ready():
            if time.monotonic() > deadline:
                raise LoopError(f"the gateway was not ready in {timeout_s:.0f} s; see {gateway.log_path}")
            await asyncio.sleep(0.5)
    except BaseException:  # not ready, or the loop is ending (SIGTERM, Ctrl-C): the process is not left behind
        await gateway.stop()
        raise
    return gateway


async def run_trainer(config: Path, extra: list[str], timeout_s: float) -> tuple[str, str]:
    """``python -m trainer run`` with the gold reward sealed off; its outcome (trained, skipped) and output."""
    code, stdout, stderr = await run_child(
        [sys.executable, "-m", "toyworld.loop.sealed", "trainer", "run", "--config", str(config), "--quiet", *extra],
        timeout_s,
        "the training round",
    )
    if code != 0:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise LoopError(f"the training round failed (exit {code}): {' | '.join(tail)}")
    first = next((line for line in stdout.splitlines() if line.startswith("round ")), "round unknown:")
    return first.removeprefix("round ").split(":", 1)[0], stdout


async def run_child(args: list[str], timeout_s: float, what: str) -> tuple[int, str, str]:
    """A child process to its end: exit code, stdout, stderr. Past ``timeout_s``, or when the awaiting task is
    cancelled (SIGTERM, ``terminable``), the child is terminated (killed 10 s later) before this returns or raises: a
    training round never outlives the loop that started it."""
    child = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), timeout_s)
    except TimeoutError:
        await _stop(child)
        raise LoopError(f"{what} ran past {timeout_s:.0f} s and was stopped") from None
    except BaseException:
        await asyncio.shield(_stop(child))
        raise
    assert child.returncode is not None
    return child.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is not None:
        return
    with suppress(ProcessLookupError):
        child.terminate()
    try:
        await asyncio.wait_for(child.wait(), 10)
    except TimeoutError:
        with suppress(ProcessLookupError):
            child.kill()
        await child.wait()


async def unload_adapters(session: aiohttp.ClientSession, vllm: str, served_name: str) -> None:
    """Unload every adapter from vLLM (a finished run's versions; the next run's are named alike)."""
    async with session.get(f"{vllm}/v1/models") as response:
        models = [m["id"] for m in (await response.json())["data"]]
    for name in models:
        if name != served_name:
            async with session.post(f"{vllm}/v1/unload_lora_adapter", json={"lora_name": name}) as response:
                await response.read()


class Terminated(LoopError):
    """SIGTERM (a job's deletion, `kill`): the loop stopped the gateway and vLLM it started, and ends."""

    def __init__(self) -> None:
        super().__init__("stopped by SIGTERM; the gateway and vLLM it started are stopped")


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop (starting vLLM, between runs): unwind through the ``finally``s."""
    raise Terminated()


async def terminable(run: Coroutine[Any, Any, T]) -> T:
    """``run``, cancelled on SIGTERM so that its ``finally``s stop what it started (the gateway, started in a
    session of its own, would not get a signal sent to the loop's process group); then ``Terminated``."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await run
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise
    finally:
        if main:
            loop.remove_signal_handler(signal.SIGTERM)  # leaves SIG_DFL: put back the handler it replaced
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
