"""A vLLM OpenAI server as a managed subprocess (the embedded default's generator).

Knows the command line (runtime LoRA enabled, ready for hot-swap), the environment that
keeps vLLM offline and small on a CPU, how to wait for it to be healthy, how to notice
that it died, and how to stop it. Refuses to start when its port is taken, with a message
that says so. Used by the gateway's lifespan and by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO


class VLLMStartError(Exception):
    """vLLM could not be started or did not become healthy; the message says why."""


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class VLLMProcess:
    def __init__(
        self,
        model: Path,
        served_name: str,
        host: str = "127.0.0.1",
        port: int = 8100,
        *,
        max_model_len: int = 256,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        dtype: str = "auto",
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        pooling: bool = False,
        lora: bool = True,
        env: dict[str, str] | None = None,
        log_level: str = "INFO",
        nice: int = 0,
    ) -> None:
        """``log_level``: vLLM's own (``VLLM_LOGGING_LEVEL``), set rather than inherited: importing TRL sets ERROR in
        its process's environment (``trl._compat``), which would silence every vLLM that process starts afterwards,
        its request log too. ``env`` overrides it. ``nice``: the server's CPU priority, inherited by its engine and
        workers (``os.nice``: 10 lets a reward model on the same cores run when it needs to)."""
        self.model = model
        self.served_name = served_name
        self.host = host
        self.port = port
        self.log_path = log_path or Path(f"vllm-{served_name}-{port}.log")
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", served_name,
            "--host", host, "--port", str(port),
            "--max-model-len", str(max_model_len), "--dtype", dtype,
        ]  # fmt: skip
        if pooling:
            args += ["--runner", "pooling"]
        elif lora:
            args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras)]
        self.args = args + list(extra_args or [])
        self.env = dict(env or {})
        """Extra environment (e.g. ``VLLM_CPU_OMP_THREADS_BIND``)."""
        self.log_level = log_level
        self.nice = nice
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The API server's process id (the leader of vLLM's process group); None when not running."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if not (self.model / "config.json").is_file():
            raise VLLMStartError(
                f"no model at {self.model} (config.json missing); build it first (`make models`, `python -m toyworld bootstrap`)"
            )
        if not port_free(self.host, self.port):
            raise VLLMStartError(
                f"port {self.port} on {self.host} is already in use; stop what holds it or set managed_vllm.port"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:  # started again after its process died (killed from outside)
            self._log.close()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.args, env=self.environment(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=self._lower_priority if self.nice else None,  # os.nice alone runs between fork and exec
        )  # fmt: skip

    def _lower_priority(self) -> None:
        os.nice(self.nice)

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, offline, runtime LoRA updates on, a small KV cache on a CPU,
        vLLM's log level, then ``env``."""
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_LOGGING_LEVEL": self.log_level,
            **self.env,
        }

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # start_new_session made the server a group leader

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is None:
                raise VLLMStartError(f"vLLM on port {self.port} was stopped while starting")
            code = self.returncode()
            if code is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {code} while starting; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMStartError(f"vLLM did not become healthy within {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    async def wait_healthy_async(self, timeout_s: float) -> None:
        await asyncio.to_thread(self.wait_healthy, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server and its whole process group (vLLM's engine core is a child process
        that outlives a server killed with SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
