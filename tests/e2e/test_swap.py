"""Rounds end to end: traffic through the gateway → log → DPO → registry → hot-swap.

Real vLLM (CPU, runtime LoRA), the real reward model, SQLite, and `python -m trainer run`
as its own process while requests keep flowing: a LoRA round, then a full fine-tune
(swapped blue-green: the gateway starts a second vLLM), then a rollback by hand. Checks:
no request fails across any swap, later responses (and their log records) carry the new
version, and what vLLM serves under the new name reproduces the trainer's probe log-probs
(and the base model's do not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.metrics import sample, scrape
from gateway.settings import GatewaySettings
from gateway.store.sql import SqlStore
from tests.e2e.conftest import running_gateway
from tests.polling import wait_until
from versioning.probe import Probe, difference

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
QUESTIONS = [f"What is {a} + {b}?" for a in range(1, 6) for b in range(1, 5)]


def _ask(client: httpx.Client, url: str, question: str) -> httpx.Response:
    body = {"model": "toy-bon", "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 1.0}
    return client.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_a_trained_version_is_swapped_in_under_traffic(policy_vllm: str, test_models: Path, tmp_path: Path) -> None:
    url_db = f"sqlite:///{tmp_path / 'data' / 'gateway.db'}"
    registry = tmp_path / "registry"
    settings = GatewaySettings(
        store={"data_dir": tmp_path / "data", "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        scorer={"model_dir": test_models / "reward_model", "threads": 1},  # type: ignore[arg-type]
        swap={"registry_dir": registry, "poll_s": 0.2, "drain_s": 0, "full_cpu_binds": ["1", "0"]},  # type: ignore[arg-type]
        n_candidates=4,
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"url": url_db},
                "trainer": {
                    "registry_dir": str(registry),
                    "base_policy": str(test_models / "policy"),
                    "min_pairs": 8,
                    # The core vLLM's auto binding leaves free (it reserves the last): on vLLM's busy core, torch's start
                    # waited minutes for its core count and 2 threads made DPO steps ~30x slower (trainer.cpu).
                    "cpus": [max(os.sched_getaffinity(0))],
                    "adapter": {"lora_r": 8, "lora_alpha": 16},
                    "dpo": {"epochs": 1, "batch_size": 8, "learning_rate": 2e-3},
                    "evaluation": {"prompts": 4, "max_new_tokens": 12},
                },
            }
        )
    )
    with running_gateway(settings) as url, httpx.Client() as client:
        # 1. Traffic served by the base policy fills the log.
        for question in QUESTIONS:
            response = _ask(client, url, question)
            assert response.status_code == 200, response.text
            assert response.headers["x-policy-version"] == "base"
        store = SqlStore(url_db)
        wait_until(lambda: len(list(store.read_completions(0.0, None))) == len(QUESTIONS), timeout_s=30)

        # 2. A round runs while requests keep flowing.
        def train(config: Path) -> None:
            trained = subprocess.run(
                [sys.executable, "-m", "trainer", "run", "--config", str(config), "--quiet"],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            assert trained.returncode == 0, trained.stderr[-3000:]
            assert "round trained" in trained.stdout

        seen = _under_traffic(url, lambda: train(config), "v0001", pause_s=0.2)  # paced: the round needs the CPU too

        # 3. No request failed; once v0001 answered, every later answer came from it.
        _switched_once(seen, "base", "v0001")
        wait_until(lambda: any(r.policy_version == "v0001" for r in store.read_completions(0.0, None)), timeout_s=30)

        # 4. The gateway verified the swap, and vLLM's own log-probs under the new name match the trainer's probe.
        assert sample(url, "bon_swaps_total", {"result": "ok"}) == 1.0
        served_diff = sample(url, "bon_swap_probe_diff_nats", {"backend": policy_vllm})
        assert served_diff is not None
        assert served_diff < 1e-3
        probe = Probe.load(registry / "policy" / "versions" / "v0001")
        assert difference(probe.top, _served(policy_vllm, "policy@v0001", probe.prefixes)) < 1e-3
        # ... and the base model's do not: the check tells the right adapter from another model.
        assert difference(probe.top, _served(policy_vllm, "policy", probe.prefixes)) > 10 * max(served_diff, 1e-4)

        # 5. A full fine-tune continues v0001 and is swapped in blue-green under traffic: a second vLLM is started on
        #    the version's directory, verified with its probe and routed to alone; v0001 stays loaded for rollback.
        for question in QUESTIONS:  # the next round's window: answers served by v0001
            assert _ask(client, url, question).headers["x-policy-version"] == "v0001"
        wait_until(
            lambda: sum(r.policy_version == "v0001" for r in store.read_completions(0.0, None)) >= len(QUESTIONS),
            timeout_s=30,
        )
        full = tmp_path / "config-full.yaml"
        full_config = yaml.safe_load(config.read_text())
        full_config["trainer"]["format"] = "full"
        full.write_text(yaml.safe_dump(full_config))
        # Requests are paced here: on 2 cores, back-to-back traffic starved the new vLLM's start (not healthy after
        # 240 s; 64 s with the first vLLM idle). The new vLLM is pinned to core 1 (swap.full_cpu_binds): on the serving
        # vLLM's core it got no CPU at all.
        seen = _under_traffic(url, lambda: train(full), "v0002", pause_s=0.5)
        _switched_once(seen, "v0001", "v0002")
        assert sample(url, "bon_swaps_total", {"result": "ok"}) == 2.0
        instance = _probed_backends(url) - {policy_vllm}
        assert len(instance) == 1, instance
        green = instance.pop()
        green_diff = sample(url, "bon_swap_probe_diff_nats", {"backend": green})
        assert green_diff is not None
        assert green_diff < 1e-3
        probe = Probe.load(registry / "policy" / "versions" / "v0002")
        assert difference(probe.top, _served(green, "policy@v0002", probe.prefixes)) < 1e-3
        assert "policy@v0001" in _models(policy_vllm)

        # 6. Rolling back by hand moves the pointer only; the gateway routes back to the loaded adapter at once and
        #    stops the full version's vLLM once drained.
        def rollback() -> None:
            done = subprocess.run(
                [sys.executable, "-m", "trainer", "registry", "rollback", "--config", str(config)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]

        seen = _under_traffic(url, rollback, "v0001")
        _switched_once(seen, "v0002", "v0001")
        wait_until(lambda: not _listening(green), timeout_s=60)
        store.close()


def _served(vllm: str, model: str, prefixes: list[list[int]]) -> list[dict[str, float]]:
    """vLLM's top next-token log-probs after each prefix, keyed by token id."""
    served = []
    for ids in prefixes:
        body = {
            "model": model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 5,
            "return_tokens_as_token_ids": True,
        }
        headers = {"content-type": "application/json"}
        request = urllib.request.Request(f"{vllm}/v1/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            top = json.loads(response.read())["choices"][0]["logprobs"]["top_logprobs"][0]
        served.append({t.removeprefix("token_id:"): float(v) for t, v in top.items()})
    return served


def _under_traffic(url: str, action: Callable[[], None], version: str, pause_s: float = 0.0) -> list[tuple[int, str]]:
    """Send requests one after another (``pause_s`` apart) while ``action`` runs and until ``version`` answers;
    (status, version) each."""
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client() as own:
            k = 0
            while not stop.is_set():
                response = _ask(own, url, QUESTIONS[k % len(QUESTIONS)])
                seen.append((response.status_code, response.headers.get("x-policy-version", "")))
                k += 1
                stop.wait(pause_s)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        action()
        wait_until(lambda: any(v == version for _, v in seen[-3:]), timeout_s=300)
        time.sleep(1.0)  # a few more requests on the new version
    finally:
        stop.set()
        sender.join(120)
    return seen


def _switched_once(seen: list[tuple[int, str]], old: str, new: str) -> None:
    """No request failed, and the answers switched from ``old`` to ``new`` once, never back."""
    assert seen, "no request was sent"
    assert all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    versions = [v for _, v in seen]
    first_new = versions.index(new)
    assert set(versions[:first_new]) <= {old}
    assert set(versions[first_new:]) == {new}


def _probed_backends(url: str) -> set[str]:
    return {s.labels["backend"] for s in scrape(url) if s.name == "bon_swap_probe_diff_nats"}


def _models(vllm: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm}/v1/models", timeout=10).json()["data"]}


def _listening(vllm: str) -> bool:
    try:
        httpx.get(f"{vllm}/health", timeout=2)
    except httpx.TransportError:
        return False
    return True
