"""Faults with real processes under load, each ending with a reconciliation: every request
that got a 200, and every accepted thumb, is in the log exactly once.

- vLLM killed mid-load (SIGKILL of its process group), then started again on its port:
  errors meanwhile, then answers again without restarting the gateway.
- vLLM frozen (SIGSTOP): the request timeout is honoured (504), a client's shorter
  deadline is too without counting against the backend, the circuit opens and requests
  fail fast; thawed (SIGCONT), the half-open probe closes it again.
- The reward model (a vLLM pooling server) frozen, then killed, under each
  ``scorer.on_failure`` policy side by side: fail_closed answers 503, fail_open answers
  unranked and says so; both rank again once it is back.
Each prints what it saw (statuses, times); the README's figures come from these lines.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.metrics import sample
from gateway.settings import GatewaySettings
from gateway.store.sql import SqlStore
from gateway.vllm_process import VLLMProcess
from tests.e2e.conftest import running_gateway
from tests.polling import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


@dataclass
class Answer:
    status: int
    code: str | None
    completion_id: str | None
    degraded: str | None
    ranked: bool
    elapsed_s: float
    at: float
    """``time.monotonic()`` when the request was sent."""


@dataclass
class Gateway:
    url: str
    db: Path
    thumbed: list[str] = field(default_factory=list)

    def ask(self, client: httpx.Client, **extra: Any) -> Answer:
        body = {"model": "toy-bon", "messages": MESSAGES, "max_tokens": 8, "return_candidates": True, **extra}
        at = time.monotonic()
        response = client.post(f"{self.url}/v1/chat/completions", json=body)
        elapsed = time.monotonic() - at
        data = response.json()
        if response.status_code != 200:
            error = data["error"]
            assert set(error) == {"message", "type", "param", "code"}, data  # OpenAI's error shape, always
            if response.status_code in (429, 503):
                assert int(response.headers["retry-after"]) >= 1
            return Answer(response.status_code, error["code"], None, None, False, elapsed, at)
        ranked = all(c["reward"] is not None for c in data["candidates"])
        return Answer(200, None, data["id"], response.headers.get("x-bon-degraded"), ranked, elapsed, at)

    def thumb(self, client: httpx.Client, completion_id: str) -> None:
        response = client.post(f"{self.url}/v1/feedback", json={"completion_id": completion_id, "thumb": "up"})
        assert response.status_code == 200, response.text
        self.thumbed.append(completion_id)

    def reconcile(self, answers: list[Answer]) -> None:
        """Every 200 and every accepted thumb in the log, once (the ids are primary keys); nothing else answered."""
        answered = [a.completion_id for a in answers if a.completion_id is not None]
        assert len(set(answered)) == len(answered)
        store = SqlStore(f"sqlite:///{self.db}")
        try:
            wait_until(lambda: set(answered) <= set(store.completion_ids()), 60, "an answered request is not in the log")
            assert sorted(store.read_feedback(self.thumbed)) == sorted(self.thumbed)
        finally:
            store.close()


@contextmanager
def gateway(tmp: Path, name: str, policy_url: str, test_models: Path, **overrides: Any) -> Iterator[Gateway]:
    data = tmp / name
    config: dict[str, Any] = {
        "store": {"data_dir": data, "flush_interval_ms": 5},
        "backends": [{"url": policy_url, "model": "policy"}],
        "scorer": {"model_dir": test_models / "reward_model", "threads": 1},
        "swap": {"registry_dir": data / "registry"},  # empty: the base is served
        "n_candidates": 2,
        "timeouts": {"connect_s": 1, "request_s": 20},
        "breaker": {"failures": 2, "cooldown_s": 1},
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    with running_gateway(GatewaySettings(**config)) as url:
        yield Gateway(url, data / "gateway.db")


class Load:
    """Requests from ``workers`` threads until stopped, each answer kept; a thumb on every fifth 200."""

    def __init__(self, gw: Gateway, workers: int = 3, pause_s: float = 0.05) -> None:
        self.gw, self.pause_s = gw, pause_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                answer = self.gw.ask(client)
                with self._lock:
                    self.answers.append(answer)
                    thumb = answer.completion_id is not None and len(self.answers) % 5 == 0
                if thumb and answer.completion_id is not None:
                    self.gw.thumb(client, answer.completion_id)
                time.sleep(self.pause_s if answer.status == 200 else 0.2)

    def count(self, predicate: Callable[[Answer], bool]) -> int:
        with self._lock:
            return sum(1 for a in self.answers if predicate(a))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)


def kept(answers: list[Answer], answer: Answer) -> Answer:
    """``answer``, appended to ``answers`` (what is reconciled) on the way."""
    answers.append(answer)
    return answer


def sigkill(process: VLLMProcess) -> None:
    """SIGKILL to vLLM's whole process group (its engine core too), as an OOM kill or a crashed node would."""
    assert process.pid is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.stop()  # reaps it


def freeze(process: VLLMProcess, sig: signal.Signals) -> None:
    assert process.pid is not None
    os.killpg(process.pid, sig)


def circuit_open(gw: Gateway, backend: str) -> float | None:
    return sample(gw.url, "bon_backend_circuit_open", {"backend": backend})


def test_vllm_killed_mid_load_then_back(policy_vllm_process: VLLMProcess, test_models: Path, tmp_path: Path) -> None:
    with gateway(tmp_path, "kill", policy_vllm_process.url, test_models) as gw:
        with Load(gw) as load:
            wait_until(lambda: load.count(lambda a: a.status == 200) >= 10, 120, "no answers before the kill")
            sigkill(policy_vllm_process)
            killed = time.monotonic()
            wait_until(lambda: load.count(lambda a: a.at > killed and a.status == 503) >= 5, 60, "no 503 while vLLM was dead")
            policy_vllm_process.start()
            policy_vllm_process.wait_healthy(300)
            healthy = time.monotonic()
            wait_until(lambda: load.count(lambda a: a.at > healthy and a.status == 200) >= 10, 120, "no recovery")
        answers = load.answers
        gw.reconcile(answers)
    during = Counter(f"{a.status} {a.code}" for a in answers if killed < a.at < healthy)
    first = min(a.at + a.elapsed_s for a in answers if a.at > healthy and a.status == 200)
    print(
        f"\nvLLM SIGKILLed mid-load: {sum(a.status == 200 for a in answers)} answered of {len(answers)}; while it was down "
        f"(restart {healthy - killed:.0f} s) {dict(during)}; first answer {first - healthy:.2f} s after it was healthy again; "
        f"{len(gw.thumbed)} thumbs; every 200 and thumb in the log"
    )
    assert {a.status for a in answers} <= {200, 502, 503}  # 502: the requests vLLM was running when it died
    assert all(a.status == 200 for a in answers if a.at > first)  # recovered, the gateway never restarted


def test_vllm_frozen_the_deadline_holds_the_circuit_opens_and_closes(
    policy_vllm_process: VLLMProcess, test_models: Path, tmp_path: Path
) -> None:
    backend = policy_vllm_process.url
    with gateway(tmp_path, "freeze", backend, test_models, timeouts={"request_s": 3}) as gw, httpx.Client(timeout=120) as c:
        answers = [gw.ask(c)]
        gw.thumb(c, answers[0].completion_id or "")
        freeze(policy_vllm_process, signal.SIGSTOP)
        try:
            short = gw.ask(c, deadline_ms=1000)  # the client's own deadline: not the backend's fault
            assert (short.status, short.code) == (504, "deadline_exceeded")
            assert circuit_open(gw, backend) == 0
            timeouts = [gw.ask(c), gw.ask(c)]  # breaker.failures = 2
            assert [(a.status, a.code) for a in timeouts] == [(504, "backend_timeout")] * 2
            assert all(3 <= a.elapsed_s < 15 for a in timeouts)  # timeouts.request_s, not "forever"
            assert circuit_open(gw, backend) == 1
            fast = gw.ask(c)  # the circuit is open: refused at once, with Retry-After
            assert (fast.status, fast.code) == (503, "backend_unavailable")
        finally:
            freeze(policy_vllm_process, signal.SIGCONT)
        answers += [short, *timeouts, fast]
        thawed = time.monotonic()
        wait_until(lambda: kept(answers, gw.ask(c)).status == 200, 60, "no answer after SIGCONT")  # the half-open probe
        recovered = time.monotonic() - thawed
        assert circuit_open(gw, backend) == 0
        answers.append(gw.ask(c))
        gw.reconcile(answers)
    print(
        f"\nvLLM SIGSTOPped: deadline_ms=1000 -> 504 in {short.elapsed_s:.2f} s (circuit still closed); request_s=3 -> 504 "
        f"in {timeouts[0].elapsed_s:.2f} s and {timeouts[1].elapsed_s:.2f} s; open circuit -> "
        f"503 in {fast.elapsed_s * 1000:.0f} ms; SIGCONT -> answering again in {recovered:.2f} s; every 200 and thumb in the log"
    )
    assert answers[-1].status == 200


def test_reward_model_frozen_then_killed_under_each_policy(
    policy_vllm: str, reward_vllm_process: VLLMProcess, test_models: Path, tmp_path: Path
) -> None:
    scorer = {"kind": "remote", "remote_url": reward_vllm_process.url, "remote_model": "reward", "deadline_ms": 1500}
    with ExitStack() as stack:
        gws = {
            policy: stack.enter_context(
                gateway(tmp_path, policy, policy_vllm, test_models, scorer={**scorer, "on_failure": policy}, n_candidates=3)
            )
            for policy in ("fail_closed", "fail_open")
        }  # fmt: skip
        c = stack.enter_context(httpx.Client(timeout=120))
        answers: dict[str, list[Answer]] = {policy: [] for policy in gws}
        waited: list[Answer] = []
        seen: dict[str, dict[str, tuple[int, str | None, float]]] = {}

        def round_(phase: str) -> None:
            for policy, gw in gws.items():
                answer = gw.ask(c)
                answers[policy].append(answer)
                if answer.completion_id is not None:
                    gw.thumb(c, answer.completion_id)  # a thumb is accepted whatever the reward model does
                seen.setdefault(phase, {})[policy] = (answer.status, answer.code or answer.degraded, answer.elapsed_s)

        round_("healthy")
        freeze(reward_vllm_process, signal.SIGSTOP)
        try:
            round_("frozen")
        finally:
            freeze(reward_vllm_process, signal.SIGCONT)
        round_("thawed")
        sigkill(reward_vllm_process)
        round_("dead")
        reward_vllm_process.start()
        reward_vllm_process.wait_healthy(300)
        back = gws["fail_closed"]
        wait_until(lambda: kept(waited, back.ask(c)).status == 200, 60, "the reward model is back, the gateway is not")
        round_("back")
        for policy, gw in gws.items():
            gw.reconcile(answers[policy] + (waited if policy == "fail_closed" else []))
    print("\nreward model faults (status, code or x-bon-degraded, seconds):")
    for phase, by_policy in seen.items():
        print(f"  {phase:8s} " + "  ".join(f"{p}: {s} {w} {t:.2f} s" for p, (s, w, t) in by_policy.items()))
    closed, opened = answers["fail_closed"], answers["fail_open"]
    for k in (0, 2, 4):  # healthy, thawed, back: ranked
        assert (closed[k].status, closed[k].ranked, opened[k].status, opened[k].ranked) == (200, True, 200, True)
    assert [(a.status, a.code) for a in (closed[1], closed[3])] == [(503, "reward_model_unavailable")] * 2
    assert [(a.status, a.degraded, a.ranked) for a in (opened[1], opened[3])] == [
        (200, "scorer_timeout", False),
        (200, "scorer_failed", False),
    ]
    assert opened[1].elapsed_s < 15  # scorer.deadline_ms (1.5 s), not the frozen server's "forever"
