"""``python -m gateway serve`` as an operator runs it: managed vLLM, then SIGTERM (what Kubernetes sends)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.vllm_process import free_port, port_free
from loadtest.servers import wait_http
from tests.polling import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_sigterm_stops_the_gateway_and_its_managed_vllm(test_models: Path, tmp_path: Path) -> None:
    port, vllm_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "n_candidates": 2,
                "managed_vllm": {"enabled": True, "model_dir": str(test_models / "policy"), "port": vllm_port},
                "scorer": {"model_dir": str(test_models / "reward_model")},
                "store": {"data_dir": str(tmp_path / "data")},
            }
        )
    )
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=tmp_path, stdout=log, stderr=log
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=300)
        assert not port_free("127.0.0.1", vllm_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped (SIGTERM)" in (tmp_path / "serve.log").read_text()
    wait_until(lambda: port_free("127.0.0.1", vllm_port), timeout_s=30, message="vLLM outlived the gateway")
    assert processes_with(f"--port\0{vllm_port}\0") == [], "a vLLM process was left behind"


def processes_with(fragment: str) -> list[int]:
    """Pids whose NUL-separated command line contains ``fragment``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # exited while we looked
    return found
