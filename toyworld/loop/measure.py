"""One policy version measured on the held-out prompts: gold, reward-model score, best-of-N, KL, length, and the reward
model's accuracy against gold on the version's own samples.

Samples through the running gateway (``n_candidates`` = samples per prompt,
``return_candidates`` for every sample's text and reward, ``store: false`` so evaluation
never enters the training log), so the figures are those of the version and reward model
actually served. Each sample is an N=1 answer; best-of-N is the reward model's pick in
disjoint groups of N (``toyworld.evaluate``). KL to the starting policy is the trainer's one
definition (``trainer.kl``: sequence-level, nats per response, the exact next-token KL
summed over answers sampled from the version, with its standard error) on the same
held-out prompts. Reads the gold reward: evaluation only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import aiohttp

from toyworld.evaluate import Estimate, best_of_n, mean_ci, own_sample_accuracy
from toyworld.gold import gold_reward

BON_NS = (1, 2, 4, 8)


class MeasureError(Exception):
    """The gateway did not answer an evaluation request."""


@dataclass
class Measurement:
    version: str
    """The policy version that answered (every answer's ``x-policy-version``)."""
    rm_version: str
    n1_gold: Estimate
    bon_gold: dict[int, float]
    rm_score: float
    kl_to_start: float
    mean_len: float
    """Mean answer length in tokens (the gateway's usage, over every sample)."""
    per_prompt_n1: list[float]
    """Mean gold of the samples, per held-out prompt (for paired comparisons)."""
    per_prompt_bon: dict[int, list[float]]
    kl_to_start_stderr: float = 0.0
    """Standard error of ``kl_to_start`` over the sampled answers."""
    per_prompt_rm: list[float] | None = None
    """Mean reward-model score of the samples, per held-out prompt (paired comparisons of the score)."""
    per_prompt_len: list[float] | None = None
    """Mean answer length in tokens, per held-out prompt."""
    rm_accuracy: Estimate | None = None
    """The serving reward model's pairwise accuracy against gold on this version's own samples (pairs of one prompt's
    samples whose gold differs; bootstrap interval over prompts): the early warning that it no longer tells better
    from worse on what the policy now writes. None: no such pair."""


async def sample(
    session: aiohttp.ClientSession, url: str, api_key: str, model: str, prompts: Sequence[str], samples: int,
    max_tokens: int, concurrency: int,
) -> tuple[list[list[str]], list[list[float]], set[str], list[float]]:  # fmt: skip
    """Per prompt: the samples' texts and rewards; the versions that answered; per prompt, mean tokens per sample."""
    headers = {"authorization": f"Bearer {api_key}"}
    texts: list[list[str]] = [[] for _ in prompts]
    rewards: list[list[float]] = [[] for _ in prompts]
    versions: set[str] = set()
    tokens: list[float] = [0.0 for _ in prompts]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: str) -> None:
        body: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "n_candidates": samples, "return_candidates": True, "store": False,
        }  # fmt: skip
        async with semaphore, session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                raise MeasureError(f"evaluation request answered {response.status}: {(await response.text())[:300]}")
            data = await response.json()
            versions.add(response.headers.get("x-policy-version", "?"))
        for candidate in data["candidates"]:
            texts[i].append(candidate["text"])
            rewards[i].append(float(candidate["reward"]))
        tokens[i] = data["usage"]["completion_tokens"] / samples

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return texts, rewards, versions, tokens


def summarise(
    version: str, rm_version: str, prompts: Sequence[str], texts: list[list[str]], rewards: list[list[float]],
    lengths: Sequence[float], kl: tuple[float, float],
) -> Measurement:  # fmt: skip
    """``lengths``: per prompt, the samples' mean tokens; ``kl``: KL to the starting policy and its standard error."""
    golds = [[gold_reward(p, t) for t in answers] for p, answers in zip(prompts, texts, strict=True)]
    samples = min(len(g) for g in golds)
    ns = [n for n in BON_NS if n <= samples]
    per_prompt_bon = {n: best_of_n(golds, rewards, n) for n in ns}
    try:
        accuracy: Estimate | None = own_sample_accuracy(golds, rewards, seed=0)
    except ZeroDivisionError:  # no pair of samples differs in gold
        accuracy = None
    return Measurement(
        version=version, rm_version=rm_version, n1_gold=mean_ci(per_prompt_bon[1]),
        bon_gold={n: fmean(v) for n, v in per_prompt_bon.items()}, rm_score=fmean(r for rs in rewards for r in rs),
        kl_to_start=kl[0], mean_len=fmean(lengths), per_prompt_n1=per_prompt_bon[1], per_prompt_bon=per_prompt_bon,
        kl_to_start_stderr=kl[1], per_prompt_rm=[fmean(r) for r in rewards], per_prompt_len=list(lengths), rm_accuracy=accuracy,
    )  # fmt: skip


def kl_to_start(
    base_policy: Path, version_dir: Path | None, prompts: Sequence[str], max_new_tokens: int, seed: int
) -> tuple[float, float]:
    """``trainer.kl`` on the held-out prompts: the version (a LoRA adapter over the base) against the base, and its
    standard error; exactly 0 for the base itself."""
    if version_dir is None:
        return 0.0, 0.0
    from transformers import AutoTokenizer

    from trainer import kl
    from trainer.adapter import load_adapter, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(base_policy)
    model = load_adapter(base_policy, version_dir)
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    drift = kl.measure(model, tokenizer.eos_token_id, tokenizer.pad_token_id, ids, max_new_tokens, seed=seed)
    return drift.kl, drift.kl_stderr
