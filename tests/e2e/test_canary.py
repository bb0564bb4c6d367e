"""A deliberately worse version is canaried on live traffic and rolled back without a person.

Real vLLM (CPU, runtime LoRA), the real reward model, SQLite, and ``python -m trainer run``
publishing to the ``canary`` pointer. The worse version is DPO on reversed pairs: the logged
rewards are negated before the round, so it learns to prefer what the reward model ranks
last. Checks: each response's ``x-policy-version`` is the version that produced it (greedy
answers equal vLLM's own under that version's name, and the two versions answer differently);
the canary gets about its share of users; the gate rolls it back on the reward interval (the
length and KL guardrails are set out of reach here, so the live comparison decides), the
decision is in ``gate.jsonl``, the metrics and the log with its reason; no request fails;
afterwards everyone gets the current version and the canary's adapter is unloaded.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text

from gateway.metrics import sample
from gateway.routing import in_canary
from gateway.settings import GatewaySettings
from gateway.store.sql import SqlStore
from tests.e2e.conftest import running_gateway
from tests.polling import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
QUESTIONS = [f"What is {a} + {b}?" for a in range(1, 7) for b in range(1, 7)]
FRACTION = 0.5


def _ask(client: httpx.Client, url: str, question: str, user: str, n: int, temperature: float = 1.0) -> httpx.Response:
    body = {
        "model": "toy-bon", "messages": [{"role": "user", "content": question}], "max_tokens": 24,
        "temperature": temperature, "n_candidates": n, "user": user,
    }  # fmt: skip
    return client.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _direct(client: httpx.Client, vllm: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}
    response = client.post(f"{vllm}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def test_a_worse_version_is_canaried_and_rolled_back_automatically(
    policy_vllm: str, test_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.canary")
    url_db = f"sqlite:///{tmp_path / 'data' / 'gateway.db'}"
    registry = tmp_path / "registry"
    settings = GatewaySettings(
        store={"data_dir": tmp_path / "data", "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        scorer={"model_dir": test_models / "reward_model", "threads": 1},  # type: ignore[arg-type]
        swap={"registry_dir": registry, "poll_s": 0.2, "drain_s": 0},  # type: ignore[arg-type]
        canary={  # type: ignore[arg-type]
            "fraction": FRACTION,
            "poll_s": 0.5,
            "min_requests": 40,
            "looks": 3,
            "reward_margin": 0.0,
            "max_length_ratio": 100.0,
            "max_kl": None,
        },
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
                    "publish_to": "canary",
                    "min_pairs": 8,
                    "adapter": {"lora_r": 8, "lora_alpha": 16},
                    "dpo": {"epochs": 3, "batch_size": 8, "learning_rate": 5e-3},
                    "evaluation": {"prompts": 4, "max_new_tokens": 12},
                },
            }
        )
    )
    with running_gateway(settings) as url, httpx.Client() as client:
        # 1. Best-of-4 traffic on the base policy fills the log; then its rewards are negated (reversed pairs).
        for k, question in enumerate(QUESTIONS):
            assert _ask(client, url, question, f"warmup{k}", n=4).status_code == 200
        store = SqlStore(url_db)
        wait_until(lambda: len(list(store.read_completions(0.0, None))) == len(QUESTIONS), timeout_s=30)
        engine = create_engine(url_db)
        with engine.begin() as conn:
            conn.execute(text("UPDATE candidates SET reward = -reward WHERE reward IS NOT NULL"))
        engine.dispose()

        # 2. A round publishes the worse version as the canary; the gateway loads and verifies it.
        trained = subprocess.run(
            [sys.executable, "-m", "trainer", "run", "--config", str(config), "--quiet"],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        wait_until(lambda: client.get(f"{url}/admin/policy").json()["canary"] == "v0001", timeout_s=60)
        assert not (registry / "policy" / "current.json").exists()  # current stays the base policy

        # 3. x-policy-version names the version that answered: greedy answers equal vLLM's own under that name.
        users = [f"probe{i}" for i in range(40)]
        inside = [u for u in users if in_canary(f"user:{u}", "v0001", FRACTION)][:3]
        outside = [u for u in users if not in_canary(f"user:{u}", "v0001", FRACTION)][:3]
        differs = 0
        for user, question in zip(inside + outside, QUESTIONS, strict=False):
            response = _ask(client, url, question, user, n=1, temperature=0.0)
            version = response.headers["x-policy-version"]
            assert version == ("v0001" if user in inside else "base")
            answer = response.json()["choices"][0]["message"]["content"]
            assert answer == _direct(client, policy_vllm, "policy@v0001" if version == "v0001" else "policy", question)
            differs += _direct(client, policy_vllm, "policy@v0001", question) != _direct(client, policy_vllm, "policy", question)
        assert differs > 0, "the two versions answer alike: the header check above would not tell them apart"

        # 4. Live traffic (N=1, many users) until the gate decides.
        seen: list[tuple[int, str]] = []
        k = 0
        while (registry / "policy" / "canary.json").exists():
            response = _ask(client, url, QUESTIONS[k % len(QUESTIONS)], f"user{k}", n=1)
            seen.append((response.status_code, response.headers.get("x-policy-version", "")))
            k += 1
            assert k < 1500, "the gate did not decide"
        assert all(status == 200 for status, _ in seen)
        share = sum(v == "v0001" for _, v in seen) / len(seen)
        assert abs(share - FRACTION) < 0.15, share

        # 5. It was rolled back on the live reward, and says so in gate.jsonl, the metrics and the log.
        looks = [json.loads(line) for line in (registry / "policy" / "gate.jsonl").read_text().splitlines()]
        last = looks[-1]
        assert last["action"] == "rollback", looks
        assert last["by"] == "gate"
        assert "reward fell" in last["reason"], last
        assert last["reward_diff"][2] < 0
        # the gate counts its decision just after moving the pointers (in its own thread): wait for it, not race it
        wait_until(
            lambda: sample(url, "bon_canary_decisions_total", {"action": "rollback", "by": "gate"}) == 1.0,
            timeout_s=10, message="the rollback to be counted",
        )  # fmt: skip
        wait_until(
            lambda: any("rollback" in r.getMessage() and "reward fell" in r.getMessage() for r in caplog.records),
            timeout_s=10, message="the rollback to be logged",
        )  # fmt: skip

        # 6. Everyone gets the current version again, and the canary's adapter is unloaded after drain.
        wait_until(lambda: client.get(f"{url}/admin/policy").json()["canary"] is None, timeout_s=30)
        for i in range(10):
            assert _ask(client, url, QUESTIONS[i], inside[0] if i % 2 else f"after{i}", n=1).headers["x-policy-version"] == "base"
        wait_until(lambda: "policy@v0001" not in _models(client, policy_vllm), timeout_s=30)
        store.close()


def _models(client: httpx.Client, vllm: str) -> set[str]:
    return {m["id"] for m in client.get(f"{vllm}/v1/models", timeout=10).json()["data"]}
