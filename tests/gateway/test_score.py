"""The in-process reward model, on the test preset's real model: one request's failure stays its own, an over-long
conversation is cut at its start, and background scoring never rides in, or goes before, a live request's pass."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from gateway import score
from gateway.errors import ScorerFailed
from gateway.score import Conversation, LocalRewardModel

QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]


def conv(answer: str, messages: list[dict[str, str]] | None = None) -> Conversation:
    return Conversation(messages or QUESTION, answer)


def run_with(test_models: Path, work: Any, **options: Any) -> Any:
    async def go() -> Any:
        rm = LocalRewardModel(test_models / "reward_model", "rm-test", **options)
        await rm.start()
        try:
            return await work(rm)
        finally:
            await rm.close()

    return asyncio.run(go())


def test_one_failing_request_does_not_fail_the_others_in_its_batch(test_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = score.render

    def render(tokenizer: Any, conversation: Conversation) -> str:
        if conversation.answer == "POISON":
            raise ValueError("the chat template refused this conversation")
        return real(tokenizer, conversation)

    monkeypatch.setattr(score, "render", render)

    async def work(rm: LocalRewardModel) -> Any:
        # three requests queued in the same event-loop turn: one batch (the batcher waits 500 ms for more)
        batch = await asyncio.gather(
            rm.score([conv("7."), conv("9.")]), rm.score([conv("POISON")]), rm.score([conv("Sure, 7.")]), return_exceptions=True
        )
        return batch, await rm.score([conv("7."), conv("9.")])

    (good, bad, other), alone = run_with(test_models, work, batch_wait_ms=500)
    assert good == pytest.approx(alone, abs=1e-4)
    assert isinstance(bad, ScorerFailed)
    assert "refused this conversation" in str(bad)
    assert isinstance(other, list)
    assert len(other) == 1


def test_an_over_long_conversation_is_cut_at_its_start(test_models: Path) -> None:
    """Read as its last ``max_position_embeddings`` tokens (the answer kept), as plain transformers scores them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    long = [{"role": "user", "content": "Please add these numbers: " + " plus ".join(str(i % 10) for i in range(3000))}]

    async def work(rm: LocalRewardModel) -> list[float]:
        return await rm.score([conv("7.", long), conv("7.")])

    rewards = run_with(test_models, work)
    tokenizer = AutoTokenizer.from_pretrained(test_models / "reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(test_models / "reward_model")
    ids = tokenizer(score.render(tokenizer, conv("7.", long)), add_special_tokens=False)["input_ids"]
    limit = model.config.max_position_embeddings
    assert len(ids) > 4 * limit
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids[-limit:]])).logits[0, 0])
    assert rewards[0] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(rewards[1])


def test_background_scoring_yields_to_live_requests(test_models: Path) -> None:
    passes: list[list[str]] = []

    async def work(rm: LocalRewardModel) -> None:
        forward = rm._forward

        def recorded(conversations: Any) -> list[float]:
            passes.append([c.answer for c in conversations])
            return forward(conversations)

        rm._forward = recorded  # type: ignore[method-assign]
        background = [rm.score([conv(f"background {i}.")], background=True) for i in range(12)]
        live = rm.score([conv("live 1."), conv("live 2.")])
        await asyncio.gather(*background, live)

    run_with(test_models, work, batch_wait_ms=50)
    assert passes[0] == ["live 1.", "live 2."]  # queued after the background work, scored first, alone
    assert all(len(p) <= score.BACKGROUND_BATCH for p in passes[1:])
    assert sorted(a for p in passes[1:] for a in p) == sorted(f"background {i}." for i in range(12))


def test_closing_fails_the_requests_still_waiting(test_models: Path) -> None:
    """A reward model swapped out under load: what was queued for it fails (and is logged unscored), never hangs."""

    async def work(rm: LocalRewardModel) -> list[Any]:
        waiting = [asyncio.ensure_future(rm.score([conv(f"{i}.")], background=True)) for i in range(40)]
        await asyncio.sleep(0)  # queued
        await rm.close()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 30)

    async def go() -> list[Any]:
        rm = LocalRewardModel(test_models / "reward_model", "rm-test")
        await rm.start()
        return await work(rm)

    results = asyncio.run(go())
    assert all(isinstance(r, ScorerFailed | list) for r in results)
    assert any(isinstance(r, ScorerFailed) and "closed" in str(r) for r in results)


def test_a_length_term_adds_weight_times_words_and_keeps_the_version() -> None:
    from tests.gateway.fakes import FakeScorer

    inner = FakeScorer({"short": 1.0, "a much longer answer here": 1.0})
    assert score.with_length_term(inner, 0.0) is inner
    biased = score.with_length_term(inner, 0.25)
    assert biased.version == inner.version
    conversations = [Conversation([], "short"), Conversation([], "a much longer answer here")]
    assert asyncio.run(biased.score(conversations)) == [1.25, 2.25]  # 1 word, 5 words
    penalised = score.with_length_term(inner, -0.1)
    rewards = asyncio.run(penalised.score(conversations))
    assert rewards == pytest.approx([0.9, 0.5])
    assert asyncio.run(biased.ready())
