"""The processes a benchmark starts and waits for: a mock OpenAI backend and a gateway on a config.

Each runs as a subprocess until its ``with`` block ends; ready means its health URL answers 200.
Knows nothing about what is measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from gateway.vllm_process import free_port


def wait_http(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.2)


@contextmanager
def process(args: list[str], health: str) -> Iterator[subprocess.Popen[bytes]]:
    """``args`` running until the block ends; its output is dropped, or appended to ``$BENCH_LOG_DIR/<module>.log``."""
    logs = os.environ.get("BENCH_LOG_DIR")
    if logs:
        Path(logs).mkdir(parents=True, exist_ok=True)
        with (Path(logs) / f"{args[2] if len(args) > 2 else 'process'}.log").open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(health)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def mock_backend(delay_ms: float) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(
        [sys.executable, "-m", "loadtest.mock_backend", "--port", str(port), "--delay-ms", str(delay_ms)], f"{url}/health"
    ):
        yield url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; what ``bench overhead`` divides by requests)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def proxy(backend: str) -> Iterator[tuple[str, int]]:
    """``loadtest.proxy`` in front of ``backend``: its URL and process id."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "loadtest.proxy", "--port", str(port), "--backend", backend]
    with process(args, f"{url}/health") as proc:
        yield url, proc.pid


@contextmanager
def gateway_process(settings: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """Like ``gateway``, with the process id (for its CPU time)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        store = {"data_dir": str(Path(tmp) / "data"), **settings.get("store", {})}  # the log stays in the temporary dir
        config.write_text(yaml.safe_dump({**settings, "store": store, "port": port}))
        url = f"http://127.0.0.1:{port}"
        with process([sys.executable, "-m", "gateway", "serve", "--config", str(config)], f"{url}/ready") as proc:
            yield url, proc.pid


@contextmanager
def gateway(settings: dict[str, Any]) -> Iterator[str]:
    """``python -m gateway serve`` on ``settings`` (the log in a temporary directory), warmed up; its URL."""
    with gateway_process(settings) as (url, _):
        yield url


def require_models(models: Path) -> None:
    """Exit with the command that builds them when the toy models (policy/, reward_model/) are not under ``models``."""
    if not (models / "policy" / "config.json").is_file() or not (models / "reward_model" / "config.json").is_file():
        raise SystemExit(f"no toy models under {models}: run `make models` (or `python -m toyworld bootstrap --out {models}`)")


@contextmanager
def vllm(model: Path, logs: Path, dtype: str = "auto", nice: int = 0) -> Iterator[str]:
    """A vLLM server (runtime LoRA on) serving ``model`` as ``policy`` until the block ends; its URL."""
    from gateway.vllm_process import VLLMProcess

    server = VLLMProcess(model, "policy", port=free_port(), log_path=logs / "vllm.log", dtype=dtype, nice=nice)
    server.start()
    try:
        server.wait_healthy(600)
        yield server.url
    finally:
        server.stop()


def random_adapter(base: Path, seed: int) -> Any:
    """A PEFT model of the trainer's adapter shape over ``base`` with small random LoRA weights (what serving or
    swapping one costs does not depend on what was learned)."""
    import torch
    from peft import get_peft_model

    from trainer import adapter
    from trainer.settings import AdapterSettings

    torch.manual_seed(seed)
    init = adapter.policy_model(base, None, AdapterSettings())
    model = get_peft_model(init.base, init.lora)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.01)
    return model
