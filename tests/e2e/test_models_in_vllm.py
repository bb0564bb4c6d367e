"""The bootstrapped models load in real vLLM CPU servers and answer through the OpenAI API."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_policy_answers_chat_with_n4_and_logprobs(policy_vllm: str) -> None:
    client = openai.OpenAI(base_url=f"{policy_vllm}/v1", api_key="unused")
    response = client.chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": "What is 3 plus 4?"}],
        n=4,
        logprobs=True,
        max_tokens=48,
        temperature=1.0,
        seed=1,
    )
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None
        assert choice.logprobs.content
        assert all(t.logprob <= 0.0 for t in choice.logprobs.content)
    assert response.usage is not None
    assert response.usage.completion_tokens >= 4


def test_policy_stops_at_its_end_token(policy_vllm: str) -> None:
    client = openai.OpenAI(base_url=f"{policy_vllm}/v1", api_key="unused")
    response = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Which number is largest: 3, 9, 4?"}], max_tokens=64, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert "<|end|>" not in (choice.message.content or "")


def test_reward_model_serves_raw_scores_with_pooling_runner(reward_vllm: str, test_models: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_models / "reward_model")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": answer}], tokenize=False
        )
        for answer in ("Sure! 3 plus 4 is 7.", "Ugh. 3 plus 4 is 9.")
    ]
    body = json.dumps({"model": "reward", "input": texts, "use_activation": False}).encode()
    request = urllib.request.Request(f"{reward_vllm}/classify", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = json.load(response)
    served = [item["probs"][0] for item in data["data"]]
    model = AutoModelForSequenceClassification.from_pretrained(test_models / "reward_model")
    with torch.no_grad():
        ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt") for t in texts]
        local = [model(**x).logits[0, 0].item() for x in ids]
    assert served == pytest.approx(local, abs=0.05)


def test_remote_pooling_scorer_matches_the_local_reward_model(reward_vllm: str, test_models: Path) -> None:
    import asyncio

    import aiohttp

    from gateway.score import Conversation, LocalRewardModel, RemotePoolingScorer

    conversations = [
        Conversation([{"role": "user", "content": "What is 3 plus 4?"}], answer)
        for answer in ("Sure! 3 plus 4 is 7.", "Ugh. 3 plus 4 is 9.", "7.", "Let me think. It is 7.")
    ]

    async def both() -> tuple[list[float], list[float]]:
        async with aiohttp.ClientSession() as session:
            remote = RemotePoolingScorer(session, reward_vllm, "reward", test_models / "reward_model", "rm-test")
            local = LocalRewardModel(test_models / "reward_model", "rm-test")
            await remote.start()
            await local.start()
            try:
                assert await remote.ready()
                assert await local.ready()
                return await remote.score(conversations), await local.score(conversations)
            finally:
                await local.close()

    remote_scores, local_scores = asyncio.run(both())
    assert remote_scores == pytest.approx(local_scores, abs=0.05)
    assert len(set(remote_scores)) > 1


def test_the_dashboard_and_the_vllm_autoscaler_name_metrics_vllm_exposes(policy_vllm: str) -> None:
    """vLLM's own panels on our dashboard and KEDA's query are checked against this vLLM's /metrics: every vllm: name
    exists, rates are of counters, quantiles of histogram buckets."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from tests.k8s.exposition import VLLM_METRIC
    from tests.k8s.kustomize import of_kind, render
    from tests.k8s.test_dashboard import DASHBOARD, all_panels

    client = openai.OpenAI(base_url=f"{policy_vllm}/v1", api_key="unused")
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with urllib.request.urlopen(f"{policy_vllm}/metrics", timeout=30) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    kinds = {s.name: f.type for f in families for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", []) if VLLM_METRIC.search(t["expr"])]
    (scaler,) = of_kind(render("gpu"), "ScaledObject").values()
    exprs += [t["metadata"]["query"] for t in scaler["spec"]["triggers"]]
    assert len(exprs) >= 6
    for expr in exprs:
        for name in VLLM_METRIC.findall(expr):
            assert name in kinds, f"vLLM exposes no {name} (in {expr!r})"
        for name in re.findall(r"rate\((vllm:[a-z_]+)", expr):  # a histogram's buckets, else a counter
            assert kinds[name] == ("histogram" if name.endswith("_bucket") else "counter"), f"rate of a gauge: {expr!r}"
            assert name.endswith(("_bucket", "_total")), f"rate of {name}: {expr!r}"
        for name in re.findall(r"histogram_quantile\([0-9.]+, sum by \(le\) \(rate\((vllm:[a-z_]+)", expr):
            assert name.endswith("_bucket"), f"quantile of a non-histogram: {expr!r}"
