"""The gateway end to end on real parts: vLLM CPU serving the test policy, the real reward
model in process, driven through the official ``openai`` SDK."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import psutil
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from gateway.app import create_app
from gateway.metrics import sample, scrape
from gateway.score import Conversation
from gateway.settings import VLLM_FIELDS, GatewaySettings
from gateway.store.records import CompletionRecord
from gateway.store.sql import SqlStore
from gateway.vllm_process import VLLMProcess
from tests.e2e.conftest import running_gateway
from tests.gateway.fakes import FakeScorer
from tests.polling import wait_until
from tests.serving import serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-data")


@pytest.fixture(scope="module")
def gateway_url(policy_vllm: str, test_models: Path, data_dir: Path) -> Iterator[str]:
    settings = GatewaySettings(
        store={"data_dir": data_dir, "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        scorer={"model_dir": test_models / "reward_model", "threads": 1},  # type: ignore[arg-type]
        policy_version="v-test",
        n_candidates=4,
        swap={"registry_dir": data_dir / "registry"},  # type: ignore[arg-type]  # empty: the base is served
        vllm_fields=[*VLLM_FIELDS, "ignore_eos"],  # the disconnect test's answers run to max_tokens
    )
    with running_gateway(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="none", max_retries=0, timeout=120)


def independent_rewards(test_models: Path, answers: list[str]) -> list[float]:
    """The reward model re-run in the test with plain transformers, not the gateway's code."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_models / "reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(test_models / "reward_model")
    scores = []
    for answer in answers:
        text = tokenizer.apply_chat_template([*MESSAGES, {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            scores.append(float(model(**ids).logits[0, 0]))
    return scores


def test_best_of_4_returns_the_highest_reward_candidate(client: openai.OpenAI, test_models: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="toy-bon", messages=MESSAGES, temperature=1.0, seed=3, extra_body={"n_candidates": 4, "return_candidates": True}
    )
    assert raw.headers["x-policy-version"] == "v-test"
    completion = raw.parse()
    ChatCompletion.model_validate(completion.model_dump())
    assert completion.system_fingerprint == "v-test"
    candidates = (completion.model_extra or {})["candidates"]
    assert len(candidates) == 4
    texts = [c["text"] for c in candidates]
    rescored = independent_rewards(test_models, texts)
    assert [c["reward"] for c in candidates] == pytest.approx(rescored, abs=1e-3)
    chosen = completion.choices[0].message.content
    assert chosen in texts
    assert rescored[texts.index(chosen)] == pytest.approx(max(rescored), abs=1e-3)
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= sum(1 for _ in texts)  # all four candidates counted


def test_n2_returns_two_ranked_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="toy-bon",
        messages=MESSAGES,
        n=2,
        temperature=1.0,
        seed=5,
        extra_body={"n_candidates": 4, "return_candidates": True},
    )
    assert [c.index for c in completion.choices] == [0, 1]
    rewards = {c["text"]: c["reward"] for c in (completion.model_extra or {})["candidates"]}
    first, second = (rewards[c.message.content or ""] for c in completion.choices)
    assert first >= second
    assert first == max(rewards.values())


def test_single_candidate_without_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="toy-bon", messages=MESSAGES, max_tokens=32, extra_body={"n_candidates": 1})
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("n_candidates", [1, 4])
def test_streaming_with_usage(client: openai.OpenAI, n_candidates: int) -> None:
    stream = client.chat.completions.create(
        model="toy-bon",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"n_candidates": n_candidates},
    )
    chunks = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert len({c.id for c in chunks}) == 1
    assert {c.model for c in chunks} == {"toy-bon"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])


def test_models_lists_the_alias(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["toy-bon"]


def test_ready_with_real_backend_and_reward_model(gateway_url: str) -> None:
    with urllib.request.urlopen(f"{gateway_url}/ready", timeout=10) as response:
        assert response.status == 200


def test_backend_rejection_keeps_its_status(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="toy-bon", messages=MESSAGES, extra_body={"top_k": -5, "n_candidates": 2})
    assert caught.value.status_code == 400


def _vllm_counts(policy_vllm: str) -> tuple[float, float]:
    """(requests running or waiting, tokens generated so far) from vLLM's own metrics."""
    samples = scrape(policy_vllm)

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    return total("vllm:num_requests_running") + total("vllm:num_requests_waiting"), total("vllm:generation_tokens_total")


def _wait_idle(policy_vllm: str, timeout_s: float = 20) -> float:
    """Wait until vLLM runs nothing; returns its generated-token count then."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy, tokens = _vllm_counts(policy_vllm)
        if busy == 0 or time.monotonic() > deadline:
            assert busy == 0, "vLLM still has requests running"
            return tokens
        time.sleep(0.1)


MAX_TOKENS = 192
LONG = {"model": "toy-bon", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True}


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_vllm_request(
    gateway_url: str, policy_vllm: str, policy_vllm_process: VLLMProcess, stream: bool
) -> None:
    """A client that walks away before its answer: the gateway lets go of the vLLM request, and vLLM aborts it.

    Independent of the machine's speed: vLLM's engine is frozen (SIGSTOP) for the request's whole life, so the request
    cannot finish before the client leaves. The test waits until vLLM's API server (not frozen) has added the request,
    hangs up, waits until the gateway has given the request up (499) and vLLM has logged its abort, and only then
    thaws the engine, which then drops the request instead of generating its n * MAX_TOKENS tokens (ignore_eos).

    Leaving mid-stream, after the first chunk, is ``tests/gateway/test_disconnect.py``, against a scripted backend:
    a real engine cannot be held right after its first token without racing it. Measured on this machine, vLLM's
    API server counted a running best-of-8's tokens only in bursts (its first count was 73 to 272 tokens), so
    letting the engine run "until the first token" overshot, once to the whole answer (the CI failure this replaces)."""
    tokens_before = _wait_idle(policy_vllm)
    n = 1 if stream else 8
    body = json.dumps({**LONG, "stream": stream, "n_candidates": n}).encode()
    engine = _engine_processes(policy_vllm_process)
    log = policy_vllm_process.log_path
    added, aborted = _logged(log, ADDED), _logged(log, ABORTED)
    disconnected = _disconnected(gateway_url)
    url = urlsplit(gateway_url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock, _frozen(engine):
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        _wait_added(sock, log, added + n, engine)
        sock.close()  # walk away
        wait_until(lambda: _disconnected(gateway_url) > disconnected, 30, "the gateway did not give the request up")
        wait_until(lambda: _logged(log, ABORTED) > aborted, 30, "vLLM did not abort the request the gateway let go of")
    generated = _wait_idle(policy_vllm) - tokens_before
    assert generated < n * MAX_TOKENS, f"vLLM generated {generated} of {n * MAX_TOKENS} tokens for an aborted request"


class InstantScorer(FakeScorer):
    """A stand-in reward model that answers at once: the longer the partial answer's distinct words, the better."""

    def __init__(self) -> None:
        super().__init__({})

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        return [float(len(set(c.answer.split()))) for c in conversations]


def test_a_pruned_best_of_n_on_vllm_aborts_what_it_prunes_and_answers_with_the_best_finished(
    policy_vllm: str, policy_vllm_process: VLLMProcess, data_dir: Path
) -> None:
    """``selection: prune`` on real vLLM: four one-sample requests of MAX_TOKENS each (ignore_eos), partial answers
    scored every 8 tokens (the default ``prune`` settings) by an instant stand-in scorer.

    How many are pruned depends on when vLLM's server sends the tokens, not only on the rule: here 3 of 4 in most runs
    (pruned at 8 to 16 tokens, so about 230 tokens generated instead of 4 x 192), but none in one CI run with this
    stand-in, and none in 3 of 7 runs here with the real reward model: the chunks, or the scores, came after the
    samples had reached their end, and a finished candidate is a contender, never pruned. So this
    test asks what holds either way: every candidate is pruned or whole, each pruned one is aborted in vLLM (its log)
    and cut short, vLLM generates only what the response accounts for (a sample not aborted would run on to
    MAX_TOKENS), and the answer is the best whole one; streamed, valid chunks to the end. When pruning happens
    is ``tests/gateway/test_prune.py``'s (fakes); what it saves, ``python -m loadtest.bench prune``'s."""
    settings = GatewaySettings(
        store={"data_dir": data_dir / "prune", "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        n_candidates=4, selection="prune", warmup=False, vllm_fields=[*VLLM_FIELDS, "ignore_eos"],
    )  # fmt: skip
    with (
        serving(create_app(settings, scorer=InstantScorer())) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client,
    ):
        tokens_before = _wait_idle(policy_vllm)
        aborted = _logged(policy_vllm_process.log_path, ABORTED)
        raw = client.chat.completions.with_raw_response.create(
            model="toy-bon", messages=MESSAGES, max_tokens=MAX_TOKENS, seed=5,
            extra_body={"ignore_eos": True, "return_candidates": True},
        )  # fmt: skip
        assert raw.headers["x-bon-selection"] == "prune"
        completion = raw.parse()
        candidates = (completion.model_extra or {})["candidates"]
        pruned = [c for c in candidates if c["finish_reason"] == "pruned"]
        whole = [c for c in candidates if c["finish_reason"] == "length"]
        assert len(pruned) + len(whole) == 4, candidates
        best = max(whole, key=lambda c: c["reward"])
        assert best["chosen"]
        assert completion.choices[0].message.content == best["text"]
        wait_until(lambda: _logged(policy_vllm_process.log_path, ABORTED) >= aborted + len(pruned), 30, "vLLM kept them")
        generated = _wait_idle(policy_vllm) - tokens_before
        assert completion.usage is not None
        assert completion.usage.completion_tokens <= generated
        assert generated - completion.usage.completion_tokens < 48 * len(pruned) + 1, (generated, completion.usage)
        stream = client.chat.completions.create(
            model="toy-bon", messages=MESSAGES, max_tokens=MAX_TOKENS, seed=5, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_adaptive_n_on_vllm_stays_within_the_cap_and_the_budget(policy_vllm: str, data_dir: Path) -> None:
    """Adaptive N on real vLLM, with a stand-in scorer that finds no answer better than another: the cap while the kind
    is cold, then one candidate (its gain is nil); a latency budget no request can meet gives the floor (the ``n``
    answers asked for); the chosen N is in ``x-bon-n`` and in the candidates returned, never above the cap."""
    settings = GatewaySettings(
        store={"data_dir": data_dir / "adaptive", "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        n_candidates=4, warmup=False, adaptive={"enabled": True, "min_requests": 3, "explore": 0.0},  # type: ignore[arg-type]
    )  # fmt: skip
    with (
        serving(create_app(settings, scorer=FakeScorer({}))) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client,
    ):

        def ask(**extra: Any) -> tuple[int, str | None, int]:
            raw = client.chat.completions.with_raw_response.create(
                model="toy-bon", messages=MESSAGES, max_tokens=8, metadata={"task": "add"},
                extra_body={"return_candidates": True, **extra},
            )  # fmt: skip
            completion = raw.parse()
            assert completion.choices[0].message.content
            candidates = (completion.model_extra or {}).get("candidates") or []
            return int(raw.headers["x-bon-n"]), raw.headers.get("x-bon-adaptive"), len(candidates)

        assert [ask() for _ in range(3)] == [(4, "cold", 4)] * 3
        assert ask() == (1, "spread", 1)
        for _ in range(8):  # latency for the budget to go by (N=4, the client's own)
            assert ask(n_candidates=4)[0] == 4
        assert ask(n_candidates=4, latency_budget_ms=0.001) == (1, "budget", 1)
        n, reason, returned = ask(n_candidates=4, n=2, latency_budget_ms=0.001)
        assert (n, reason, returned) == (2, "budget", 2)
        assert ask(n_candidates=4, latency_budget_ms=600_000)[:2] == (4, None)


def test_weights_with_vllm_as_the_llm_judge_change_the_choice(policy_vllm: str, data_dir: Path) -> None:
    """The ``judge`` objective against a real OpenAI-compatible server: vLLM serving the test policy judges the
    candidates it wrote (a tiny model: its verdicts carry no sense, but they are real log-probabilities read through
    the same API a hosted judge answers). Every candidate gets a judge score in [0, 1] and the reward is the weighted
    sum; the weights decide the choice: with the length alone (negative), the shortest answer wins."""
    settings = GatewaySettings(
        store={"data_dir": data_dir / "judge", "flush_interval_ms": 5},  # type: ignore[arg-type]
        backends=[{"url": policy_vllm, "model": "policy"}],  # type: ignore[list-item]
        n_candidates=4, warmup=False, objectives={"judge": {"url": policy_vllm, "model": "policy"}},  # type: ignore[arg-type]
    )  # fmt: skip
    with (
        serving(create_app(settings, scorer=InstantScorer())) as url,
        openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client,
    ):
        judged = client.chat.completions.create(
            model="toy-bon", messages=MESSAGES, max_tokens=16, seed=3,
            extra_body={"return_candidates": True, "reward_weights": {"reward_model": 1.0, "judge": 2.0}},
        )  # fmt: skip
        candidates = (judged.model_extra or {})["candidates"]
        assert len(candidates) == 4
        for c in candidates:
            assert set(c["scores"]) == {"reward_model", "judge"}
            assert 0.0 <= c["scores"]["judge"] <= 1.0
            assert c["reward"] == pytest.approx(c["scores"]["reward_model"] + 2.0 * c["scores"]["judge"])
        best = max(candidates, key=lambda c: c["reward"])
        assert judged.choices[0].message.content == best["text"]
        short = client.chat.completions.create(
            model="toy-bon", messages=MESSAGES, max_tokens=16, seed=3,
            extra_body={"return_candidates": True, "reward_weights": {"length": -1.0}},
        )  # fmt: skip
        lengths = [len(c["text"].split()) for c in (short.model_extra or {})["candidates"]]
        assert len((short.choices[0].message.content or "").split()) == min(lengths)


ADDED = "Added request "  # vLLM's request log (--enable-log-requests): once per sample of a request
ABORTED = "Aborted request(s) "


def _logged(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


def _disconnected(gateway_url: str) -> float:
    """Requests the gateway gave up because their client left (counted as nginx's 499)."""
    return sample(gateway_url, "bon_requests_total", {"status": "499"}) or 0.0


def _wait_added(sock: socket.socket, log: Path, want: int, frozen: list[psutil.Process], timeout_s: float = 60) -> None:
    """Wait until vLLM's log has added ``want`` requests in all; on timeout, fail with what the gateway answered,
    what was frozen and the log's end (the CI failure this test once had left none of them)."""
    deadline = time.monotonic() + timeout_s
    while _logged(log, ADDED) < want:
        if time.monotonic() > deadline:
            sock.setblocking(False)
            try:
                answered = sock.recv(4096)
            except BlockingIOError:
                answered = b"(nothing yet)"
            tail = log.read_text(errors="replace").splitlines()[-25:]
            names = [f"{p.pid} {p.name()}" for p in frozen]
            said = f"the gateway answered {answered!r}; frozen {names}"
            pytest.fail(f"vLLM did not add the request; {said}; vLLM's log ends:\n" + "\n".join(tail))
        time.sleep(0.01)


def _engine_processes(vllm: VLLMProcess) -> list[psutil.Process]:
    """vLLM's engine core and its workers (where the model runs): the API server's child processes named as vLLM
    names them, not its other children (multiprocessing's resource tracker, which the API server may write to)."""
    assert vllm.pid is not None
    children: list[psutil.Process] = psutil.Process(vllm.pid).children(recursive=True)
    engine = [c for c in children if c.name().startswith(("VLLM::EngineCore", "VLLM::Worker"))]
    assert engine, f"vLLM runs no engine core process: its children are {[c.name() for c in children]}"
    return engine


@contextmanager
def _frozen(processes: list[psutil.Process]) -> Iterator[None]:
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            process.resume()


def test_log_keeps_the_sampled_token_ids_of_every_candidate(client: openai.OpenAI, data_dir: Path) -> None:
    """What the trainer will use: vLLM's own token ids, for best-of-N and for a relayed stream."""
    best = client.chat.completions.create(model="toy-bon", messages=MESSAGES, max_tokens=24)
    stream = client.chat.completions.create(
        model="toy-bon", messages=MESSAGES, max_tokens=24, stream=True, extra_body={"n_candidates": 1}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    store = SqlStore(f"sqlite:///{data_dir / 'gateway.db'}")
    try:
        deadline = time.monotonic() + 10
        records: dict[str, CompletionRecord] = {}
        while time.monotonic() < deadline and not {best.id, chunks[0].id} <= set(records):
            records = {r.id: r for r in store.read_completions()}
            time.sleep(0.05)
    finally:
        store.close()
    logged = records[best.id]
    assert best.usage is not None
    assert sum(c.token_count for c in logged.candidates) == best.usage.completion_tokens
    assert all(c.token_ids and c.reward is not None and c.logprob_sum is not None for c in logged.candidates)
    assert [c.chosen for c in logged.candidates].count(True) == 1
    relayed = records[chunks[0].id]
    assert relayed.candidates[0].text == text
    assert relayed.candidates[0].token_ids  # streamed with return_token_ids, hidden from the client
    assert relayed.candidates[0].reward is not None  # scored for the log after the response


def test_a_streamed_best_of_n_is_the_same_generation_as_a_whole_one(policy_vllm: str) -> None:
    """What scoring overlapped with generation relies on: vLLM's n samples, streamed and put back together, are the
    answers it gives in one body (the same seed; the requests run one after the other, so the engine's batch is the
    same), with the same token ids, log-probs and usage; and each is handed over once, when it is finished."""
    import asyncio

    import aiohttp

    from gateway.generate import Candidate, VLLMGenerator
    from gateway.settings import Backend

    async def both() -> tuple[Any, Any, list[int]]:
        finished: list[int] = []
        async with aiohttp.ClientSession() as session:
            generator = VLLMGenerator(session, [Backend(url=policy_vllm, model="policy")], request_timeout_s=120)
            body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 1.0, "seed": 11}
            whole = await generator.generate(body, 4)
            streamed = await generator.generate(body, 4, None, lambda c: finished.append(c.index))
        return whole, streamed, finished

    whole, streamed, finished = asyncio.run(both())

    def fields(c: Candidate) -> tuple[Any, ...]:
        logprobs = [(t["token"], t["logprob"]) for t in (c.logprobs or {}).get("content") or ()]
        return c.index, c.text, c.finish_reason, c.token_ids, [t for t, _ in logprobs], c.message

    assert [fields(c) for c in streamed.candidates] == [fields(c) for c in whole.candidates]
    for s, w in zip(streamed.candidates, whole.candidates, strict=True):
        assert [t["logprob"] for t in s.logprobs["content"]] == pytest.approx([t["logprob"] for t in w.logprobs["content"]])
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
    assert sorted(finished) == [0, 1, 2, 3]
    assert len({c.text for c in whole.candidates}) > 1  # four different samples, not one repeated
