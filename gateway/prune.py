"""Early-pruned best-of-N (``selection: prune``): the weakest candidates are aborted while they decode.

Knows the pruning rule, after Speculative Rejection (Sun et al., 2024): the N samples are N
streamed requests of one sample each (so vLLM can drop any one of them; its prefix cache
shares the prompt); every ``prune.every_tokens`` tokens, once each candidate still decoding
has reached that checkpoint, the reward model scores their partial answers, and those
outside the best ``ceil(keep x alive)`` (never fewer than ``min_keep``) are aborted. With
``prune.straggler_ms``, a checkpoint waits that long after the first candidate reached it;
then it is decided among those there (``ceil(keep x them)`` go on) and each straggler
goes on untouched, compared when it reaches its checkpoint (against the others' standing
then: whole answers for those finished). A
finished candidate is scored on its whole answer as soon as it finishes (decoding goes on
meanwhile) and is never aborted: it costs nothing more. The answer is the best finished
candidate by its whole-answer reward. Pruned candidates are kept, with the text they had
when aborted, ``finish_reason`` ``pruned`` and the partial reward that pruned them: the log
keeps them and the trainer leaves them out of pairs and groups.

Does not know HTTP, the log or how the service meets deadlines (the caller's timeout
cancels it, and with it every request still open in vLLM).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from gateway.generate import Assembly, Candidate, Generation, Generator
from gateway.score import Conversation, Scorer
from gateway.settings import PruneSettings
from gateway.store.records import PRUNED


@dataclass
class Pruned:
    """What a pruned best-of-N generated: every candidate (pruned ones with their partial text), the reward of each
    (whole-answer for finished ones, partial for pruned ones), and how the pruning went."""

    generation: Generation
    rewards: list[float]
    pruned: list[int] = field(default_factory=list)
    checkpoints: int = 0

    @property
    def finished(self) -> list[int]:
        return [i for i in range(len(self.rewards)) if i not in self.pruned]


@dataclass
class Leader:
    """For a streamed answer: once pruning has left one candidate alone (none other finished or decoding), it is
    the answer, and its text goes to ``pieces`` as it decodes (what it had so far first); ``None`` ends it, when
    the generation is over (whether a leader was streamed or not: then the answer comes after selection)."""

    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    index: int | None = None


@dataclass
class _Sample:
    index: int
    assembly: Assembly = field(default_factory=Assembly)
    task: asyncio.Task[None] | None = None
    backend: str = ""
    reward: asyncio.Task[list[float]] | None = None
    """Its whole answer's reward, asked for as soon as it finished."""
    partial: float | None = None
    pruned: bool = False
    checkpoint: int = 0
    """The tokens at which it is next compared."""

    @property
    def candidate(self) -> Candidate:
        return self.assembly.parts.get(self.index) or Candidate(self.index, "", None)

    @property
    def finished(self) -> bool:
        return self.candidate.finish_reason is not None

    @property
    def tokens(self) -> int:
        return len(self.candidate.token_ids)


def sample_seeds(body: dict[str, Any], n: int) -> list[int]:
    """Each of the N requests its own seed (one seed for all would give N copies of one answer): the client's
    ``seed`` plus the candidate's index, so a seeded request is repeatable; else random ones."""
    base = body.get("seed")
    if base is None:
        base = random.randrange(2**31)
    return [int(base) + i for i in range(n)]


async def generate(
    generator: Generator,
    scorer: Scorer,
    body: dict[str, Any],
    n: int,
    messages: list[dict[str, Any]],
    settings: PruneSettings,
    models: dict[str, str] | None = None,
    leader: Leader | None = None,
) -> Pruned:
    """``n`` candidates, the weakest aborted at each checkpoint (the module's rule); raises what a sample's request
    raises, after aborting the others. ``leader``: told the candidate left alone, as it decodes."""
    samples = [_Sample(i) for i in range(n)]
    progress = asyncio.Event()

    async def follow(sample: _Sample, seed: int) -> None:
        async with aclosing(generator.sample({**body, "seed": seed}, models)) as chunks:  # cancelled: closed at once
            async for chunk in chunks:
                take(sample, chunk)

    def take(sample: _Sample, chunk: dict[str, Any]) -> None:
        sample.backend = chunk.get("backend", sample.backend)
        for choice in chunk.get("choices") or ():
            choice["index"] = sample.index  # each request's only sample is index 0
        if leader is not None and leader.index == sample.index:
            for choice in chunk.get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    leader.pieces.put_nowait(content)
        if sample.assembly.add(chunk):
            text = sample.assembly.text(sample.index)
            sample.reward = asyncio.ensure_future(scorer.score([Conversation(messages, text)]))
        progress.set()

    for sample, seed in zip(samples, sample_seeds(body, n), strict=True):
        sample.task = asyncio.ensure_future(follow(sample, seed))
    checkpoints = 0
    loop = asyncio.get_running_loop()
    patience = settings.straggler_ms / 1000 if settings.straggler_ms is not None else None
    for sample in samples:
        sample.checkpoint = settings.every_tokens
    try:
        reached_at: float | None = None
        while True:
            _raise_failed(samples)
            alive = [s for s in samples if not s.pruned]
            running = [s.task for s in alive if s.task is not None and not s.task.done()]
            if not running:
                break
            decoding = [s for s in alive if not s.finished]
            due = [s for s in decoding if s.tokens >= s.checkpoint]
            behind = [s for s in decoding if s.tokens < s.checkpoint]
            target = max(settings.min_keep, math.ceil(settings.keep * len(alive)))
            timeout: float | None = None
            if due and behind and patience is not None:  # how long the first there waits for the rest
                reached_at = loop.time() if reached_at is None else reached_at
                timeout = reached_at + patience - loop.time()
            if not due or len(alive) <= target or (behind and (timeout is None or timeout > 0)):
                progress.clear()  # no await since the state was read: nothing is missed
                await _wait(progress, running, timeout)
                continue
            checkpoints += 1
            reached_at = None
            for s in due:
                s.checkpoint += settings.every_tokens
            if behind:  # past prune.straggler_ms: decided among those there; a straggler meets its checkpoint later
                alive = [s for s in alive if s not in behind]
                target = max(settings.min_keep, math.ceil(settings.keep * len(alive)))
                if len(alive) <= target:
                    continue
            await _prune(scorer, messages, alive, due, target)
            left = [s for s in samples if not s.pruned]
            if leader is not None and leader.index is None and len(left) == 1 and not left[0].finished:
                leader.index = left[0].index
                leader.pieces.put_nowait(left[0].assembly.text(leader.index))
        rewards = await asyncio.gather(*(_reward(scorer, messages, s) for s in samples))
        # the aborted requests are closed before the answer goes out
        await asyncio.gather(*(s.task for s in samples if s.pruned and s.task is not None), return_exceptions=True)
    except BaseException:
        for s in samples:
            for task in (s.task, s.reward):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                # collected, so a failure that is not the one raised is not reported as never retrieved
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise
    finally:
        if leader is not None:
            leader.pieces.put_nowait(None)
    return Pruned(_generation(samples), list(rewards), [s.index for s in samples if s.pruned], checkpoints)


async def _wait(progress: asyncio.Event, running: Sequence[asyncio.Task[None]], timeout: float | None = None) -> None:
    """Until some sample moved on, one of those running ended, or ``timeout`` seconds passed."""
    waiter = asyncio.ensure_future(progress.wait())
    try:
        await asyncio.wait([waiter, *running], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _raise_failed(samples: list[_Sample]) -> None:
    """A sample's request failed: the request fails (not one already pruned: its answer is not needed)."""
    for s in samples:
        task = s.task
        if not s.pruned and task is not None and task.done() and not task.cancelled() and (exc := task.exception()):
            raise exc


async def _prune(scorer: Scorer, messages: list[dict[str, Any]], alive: list[_Sample], decoding: list[_Sample],
                 target: int) -> None:  # fmt: skip
    """Score the partial answers of ``decoding`` (finished ones by their whole answer) and abort those of them
    outside the best ``target`` of ``alive``."""
    partial = await scorer.score([Conversation(messages, s.assembly.text(s.index)) for s in decoding])
    for s, reward in zip(decoding, partial, strict=True):
        s.partial = reward
    standing: list[tuple[float, _Sample]] = []
    for s in alive:
        if s.reward is not None:  # finished (maybe while the partial answers were scored): its whole answer counts
            standing.append(((await s.reward)[0], s))
        else:
            assert s.partial is not None
            standing.append((s.partial, s))
    standing.sort(key=lambda pair: pair[0], reverse=True)
    for _, s in standing[target:]:
        if s.finished or s.task is None:
            continue
        s.task.cancel()  # closes its request: vLLM aborts it
        s.pruned = True
        s.assembly.parts.setdefault(s.index, Candidate(s.index, "", None))


async def _reward(scorer: Scorer, messages: list[dict[str, Any]], s: _Sample) -> float:
    if s.pruned:
        assert s.partial is not None
        return s.partial
    if s.reward is None:  # ended without a finish reason (a backend that closed the stream early): score what came
        s.reward = asyncio.ensure_future(scorer.score([Conversation(messages, s.assembly.text(s.index))]))
    return (await s.reward)[0]


def _generation(samples: list[_Sample]) -> Generation:
    candidates = []
    prompt_tokens = 0
    for s in samples:
        c = s.candidate
        c.text = s.assembly.text(s.index)
        if s.pruned:
            c.finish_reason = PRUNED
        candidates.append(c)
        prompt_tokens = max(prompt_tokens, int(s.assembly.usage.get("prompt_tokens", 0)))
    completion_tokens = sum(c.token_count for c in candidates)
    backend = next((s.backend for s in samples if s.backend), "")
    return Generation(candidates, prompt_tokens, completion_tokens, backend)
