"""The processes a benchmark starts and waits for: a mock OpenAI backend and a gateway on a config.

Each runs as a subprocess until its ``with`` block ends; ready means its health URL answers 200.
Knows nothing about what is measured.
"""

from __future__ import annotations

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
def process(args: list[str], health: str) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(health)
        yield
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


@contextmanager
def gateway(settings: dict[str, Any]) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        store = {"data_dir": str(Path(tmp) / "data"), **settings.get("store", {})}  # the log stays in the temporary dir
        data = {**settings, "store": store, "port": port}
        config.write_text(yaml.safe_dump(data))
        url = f"http://127.0.0.1:{port}"
        with process([sys.executable, "-m", "gateway", "serve", "--config", str(config)], f"{url}/ready"):  # warmed up
            yield url
