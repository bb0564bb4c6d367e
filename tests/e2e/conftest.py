"""Real servers for end-to-end tests: one policy vLLM per test session, gateways in-process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.vllm_process import VLLMProcess, free_port
from loadtest.servers import wait_http
from tests.serving import serving


@contextmanager
def running_vllm(model: Path, name: str, *, pooling: bool = False, env: dict[str, str] | None = None) -> Iterator[str]:
    with running_vllm_process(model, name, pooling=pooling, env=env) as process:
        yield process.url


@contextmanager
def running_vllm_process(
    model: Path, name: str, *, pooling: bool = False, env: dict[str, str] | None = None
) -> Iterator[VLLMProcess]:
    port = free_port()  # in the log's name too: two servers of one model (the resolver test's) keep their own logs
    process = VLLMProcess(
        model, name, port=port, max_lora_rank=8, max_loras=2, pooling=pooling, dtype="float32",
        log_path=model.parent / f"vllm-{name}-{port}.log", env=env,
        extra_args=["--enable-log-requests"],  # tests read when vLLM added and aborted a request
    )  # fmt: skip
    process.start()
    try:
        process.wait_healthy(300)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def policy_vllm_process(test_models: Path) -> Iterator[VLLMProcess]:
    """The test preset's policy on a real vLLM CPU server (runtime LoRA on), shared by the session."""
    with running_vllm_process(test_models / "policy", "policy") as process:
        yield process


@pytest.fixture(scope="session")
def policy_vllm(policy_vllm_process: VLLMProcess) -> str:
    """The base URL of ``policy_vllm_process``."""
    return policy_vllm_process.url


@pytest.fixture(scope="session")
def reward_vllm_process(test_models: Path) -> Iterator[VLLMProcess]:
    """The test preset's reward model on a real vLLM CPU server (``--runner pooling``), shared by the session."""
    with running_vllm_process(test_models / "reward_model", "reward", pooling=True) as process:
        yield process


@pytest.fixture(scope="session")
def reward_vllm(reward_vllm_process: VLLMProcess) -> str:
    """The base URL of ``reward_vllm_process``."""
    return reward_vllm_process.url


@contextmanager
def running_gateway(settings: GatewaySettings) -> Iterator[str]:
    """The real app under uvicorn in a thread, on a free port, warmed up (``/ready``); yields its base URL."""
    with serving(create_app(settings)) as url:
        wait_http(f"{url}/ready", timeout_s=300)  # 503 while it warms up
        yield url
