"""Load test of a running gateway with locust: the traffic mix users send, headless or in locust's web UI.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 2m

The mix per user: chat completions with N in {1, 4, 8} (weights 6 : 3 : 1), a share of
them streamed (``BON_STREAM_SHARE``, 0.25), a thumb through ``/v1/feedback`` on a share of
answers (``BON_THUMB_SHARE``, 0.3), and now and then a bad request (an unknown field, or N
above the gateway's limit) that must get a 400 in OpenAI's error shape. Environment:
``BON_API_KEY`` (sent as ``Authorization: Bearer``; unset: none, for a keyless gateway on
loopback), ``BON_MODEL`` (``toy-bon``), ``BON_MAX_TOKENS`` (32), ``BON_WAIT_S`` (pause
between a user's requests, 0.5). An answer that is not what the request should get (a 5xx,
a 429, a stream without ``[DONE]``, a wrong shape) is a locust failure.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from locust import FastHttpUser, between, task

PROMPTS = [f"What is {a} plus {b}?" for a in range(1, 10) for b in range(1, 10)]


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


class ChatUser(FastHttpUser):
    wait_time = between(0, 2 * float(_env("BON_WAIT_S", "0.5")))

    def on_start(self) -> None:
        key = os.environ.get("BON_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.model = _env("BON_MODEL", "toy-bon")
        self.max_tokens = int(_env("BON_MAX_TOKENS", "32"))
        self.stream_share = float(_env("BON_STREAM_SHARE", "0.25"))
        self.thumb_share = float(_env("BON_THUMB_SHARE", "0.3"))

    def _body(self, n: int, **extra: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": random.choice(PROMPTS)}]
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "n_candidates": n, **extra}

    def _chat(self, n: int) -> None:
        if random.random() < self.stream_share:
            self._stream(n)
            return
        with self.client.post(
            "/v1/chat/completions", json=self._body(n), headers=self.headers, name=f"chat N={n}", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                return
            body = response.json()
            if not body.get("choices") or body["choices"][0]["message"].get("content") is None:
                response.failure(f"no answer in {str(body)[:200]}")
                return
        if random.random() < self.thumb_share:
            self._thumb(body["id"])

    def _stream(self, n: int) -> None:
        with self.client.post(
            "/v1/chat/completions", json=self._body(n, stream=True), headers=self.headers, name=f"chat N={n} stream",
            catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                return
            events = [line[6:] for line in (response.text or "").splitlines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                response.failure("the stream did not end with [DONE]")
                return
            chunks = [json.loads(e) for e in events[:-1]]
            if any("error" in c for c in chunks) or not any(c.get("choices") for c in chunks):
                response.failure(f"a stream without an answer: {events[:3]}")

    def _thumb(self, completion_id: str) -> None:
        body = {"completion_id": completion_id, "thumb": random.choice(["up", "down"])}
        with self.client.post("/v1/feedback", json=body, headers=self.headers, name="feedback", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")

    @task(6)
    def chat_n1(self) -> None:
        self._chat(1)

    @task(3)
    def chat_n4(self) -> None:
        self._chat(4)

    @task(1)
    def chat_n8(self) -> None:
        self._chat(8)

    @task(1)
    def bad_request(self) -> None:
        body = random.choice([self._body(1, not_a_field=True), self._body(1_000)])
        with self.client.post(
            "/v1/chat/completions", json=body, headers=self.headers, name="bad request (400 expected)", catch_response=True
        ) as response:
            error = response.json().get("error", {}) if response.status_code == 400 else {}
            if set(error) == {"message", "type", "param", "code"}:
                response.success()
            else:
                response.failure(f"expected an OpenAI-style 400, got {response.status_code}: {(response.text or '')[:200]}")
