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
