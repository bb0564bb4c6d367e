"""Scoring: a reward for each candidate answer in its conversation.

Two real scorers behind one protocol:
- ``LocalRewardModel``: a transformers ``*ForSequenceClassification`` (one label) in this
  process. Conversations from concurrent requests are batched into one forward pass by a
  batcher task; the forward pass runs in one worker thread, never on the event loop, on
  ``cuda`` when there is one, with torch's threads bounded so vLLM keeps its cores. When a
  shared pass fails (one request's conversation breaks the chat template, memory runs
  out), each request in it is scored on its own, so only the one at fault fails. Inputs
  longer than ``max_length`` tokens keep their end (the answer) and lose their beginning.
  Background work (``score(..., background=True)``: scoring a relayed answer for the log)
  waits while live requests are queued, and rides in small batches of its own.
- ``RemotePoolingScorer``: a vLLM ``--runner pooling`` server's ``/classify``, asked for
  raw logits (``use_activation: false``), which is what Bradley-Terry rewards are.

Both render a conversation with the reward model's own chat template. Does not choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from gateway.errors import ScorerFailed


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    """Role and text of each message before the answer."""
    answer: str


class Scorer(Protocol):
    version: str

    async def start(self) -> None: ...

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        """A reward per conversation; ``background``: no client waits for it (it yields to those that do)."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class LengthTerm:
    """A scorer's rewards plus ``weight`` × each answer's length in words (``scorer.length_weight``): negative, a length
    penalty; positive, a planted length bias (what the reward-hacking watch is tested against). The version label is
    the inner scorer's: the term is the deployment's setting, and the trainer's windows follow the reward model's
    versions."""

    def __init__(self, inner: Scorer, weight: float) -> None:
        self.inner = inner
        self.weight = weight
        self.version = inner.version

    async def start(self) -> None:
        await self.inner.start()

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        rewards = await self.inner.score(conversations, background=background)
        return [r + self.weight * len(c.answer.split()) for r, c in zip(rewards, conversations, strict=True)]

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()


def with_length_term(scorer: Scorer, weight: float) -> Scorer:
    return LengthTerm(scorer, weight) if weight else scorer


def render(tokenizer: Any, conversation: Conversation) -> str:
    """A conversation and its answer as the reward model reads it: its own chat template, not tokenized."""
    messages = [*conversation.messages, {"role": "assistant", "content": conversation.answer}]
    text: str = tokenizer.apply_chat_template(messages, tokenize=False)
    return text


@dataclass(order=True)
class _Job:
    due: float
    """When it arrived; a background job as if it arrived ``BACKGROUND_DELAY_S`` later (so it never starves)."""
    seq: int
    background: bool = field(compare=False)
    conversations: Sequence[Conversation] = field(compare=False)
    future: asyncio.Future[list[float]] = field(compare=False)


BACKGROUND_BATCH = 8
"""Most conversations in a background batch: a live request arriving meanwhile waits for at most that."""
BACKGROUND_DELAY_S = 2.0
"""A background job goes after live jobs that arrive up to this much later, before those that arrive after."""


class LocalRewardModel:
    """An in-process transformers reward model with cross-request batching."""

    def __init__(
        self,
        model_dir: Path,
        version: str,
        device: str = "auto",
        threads: int = 1,
        max_batch: int = 64,
        batch_wait_ms: float = 2.0,
        max_length: int | None = None,
    ) -> None:
        """``max_length``: tokens the model reads at most (None: its ``max_position_embeddings``)."""
        self.version = version
        self._max_length = max_length
        self._model_dir = model_dir
        self._device_name = device
        self._threads = threads
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_ms / 1000
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self._queue: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._jobs = itertools.count()
        self._batcher: asyncio.Task[None] | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._batcher = asyncio.create_task(self._run_batches(), name="reward-model-batcher")

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(self._threads)
        name = self._device_name
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(name)
        self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        self._tokenizer.padding_side = "right"
        self._tokenizer.truncation_side = "left"  # an over-long conversation keeps its answer
        model = AutoModelForSequenceClassification.from_pretrained(self._model_dir)
        if model.config.num_labels != 1:
            raise ValueError(f"{self._model_dir} is not a reward model: {model.config.num_labels} labels, expected 1")
        if self._max_length is None:
            self._max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._model = model.to(self._device).eval()

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        if self._batcher is None or self._batcher.done():
            raise ScorerFailed("the reward model is not running")
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        due = asyncio.get_running_loop().time() + (BACKGROUND_DELAY_S if background else 0.0)
        await self._queue.put(_Job(due, next(self._jobs), background, conversations, future))
        return await future

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]  # by arrival, background jobs as if later (``BACKGROUND_DELAY_S``)
            background = jobs[0].background
            limit = BACKGROUND_BATCH if background else self._max_batch
            size = len(jobs[0].conversations)
            deadline = loop.time() + (0 if background else self._batch_wait_s)
            while size < limit:
                timeout = deadline - loop.time()
                try:
                    job = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if job.background != background:
                    self._queue.put_nowait(job)  # a batch is all live or all background
                    break
                jobs.append(job)
                size += len(job.conversations)
            live = [job for job in jobs if not job.future.done()]  # a cancelled request needs no score
            if not live:
                continue
            try:
                await self._score_jobs(live)
            except asyncio.CancelledError:  # closed mid-pass: its requests fail, never hang
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(ScorerFailed(f"the reward model {self.version} was closed"))
                raise

    async def _score_jobs(self, jobs: list[_Job]) -> None:
        """One forward pass for all ``jobs``; if it fails, one per job, so that only the job at fault fails."""
        loop = asyncio.get_running_loop()
        try:
            rewards = await loop.run_in_executor(self._executor, self._forward, [c for job in jobs for c in job.conversations])
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    await self._score_jobs([job])
            elif not jobs[0].future.done():
                jobs[0].future.set_exception(ScorerFailed(f"the reward model failed: {exc.__class__.__name__}: {exc}"))
            return
        start = 0
        for job in jobs:
            end = start + len(job.conversations)
            if not job.future.done():
                job.future.set_result(rewards[start:end])
            start = end

    def _forward(self, conversations: Sequence[Conversation]) -> list[float]:
        import torch

        texts = [render(self._tokenizer, c) for c in conversations]
        rewards: list[float] = []
        for start in range(0, len(texts), self._max_batch):
            batch = self._tokenizer(
                texts[start : start + self._max_batch], add_special_tokens=False, padding=True, return_tensors="pt",
                truncation=self._max_length is not None, max_length=self._max_length,
            )  # fmt: skip
            with torch.inference_mode():
                logits = self._model(**{k: v.to(self._device) for k, v in batch.items()}).logits
            rewards.extend(float(x) for x in logits[:, 0].float().cpu())
        return rewards

    async def ready(self) -> bool:
        return self._model is not None and self._batcher is not None and not self._batcher.done()

    async def close(self) -> None:
        """Stop; requests still waiting (background scoring when this version is swapped out) fail, never hang."""
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ScorerFailed(f"the reward model {self.version} was closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemotePoolingScorer:
    """A vLLM ``--runner pooling`` server serving the reward model; one ``/classify`` call per request."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        tokenizer_dir: Path,
        version: str,
        timeout_s: float = 30.0,
        *,
        require_listed: bool = False,
    ) -> None:
        """``require_listed``: ``start`` fails unless the server's ``/v1/models`` lists ``model`` (a new version)."""
        self.version = version
        self._require_listed = require_listed
        self._session = session
        self._url = url.rstrip("/")
        self._model = model
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def start(self) -> None:
        from transformers import AutoTokenizer

        if self._require_listed:
            try:
                async with self._session.get(f"{self._url}/v1/models", timeout=self._timeout) as response:
                    listed = {m["id"] for m in (await response.json()).get("data", [])}
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise ScorerFailed(f"the reward model server at {self._url} failed: {exc.__class__.__name__}") from None
            if self._model not in listed:
                raise ScorerFailed(f"the reward model server at {self._url} does not serve '{self._model}' (yet)")
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._tokenizer_dir)

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        texts = [render(self._tokenizer, c) for c in conversations]
        body = {"model": self._model, "input": texts, "use_activation": False}
        try:
            async with self._session.post(f"{self._url}/classify", json=body, timeout=self._timeout) as response:
                if response.status != 200:
                    raise ScorerFailed(f"the reward model server answered HTTP {response.status}")
                data = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ScorerFailed(f"the reward model server failed: {exc.__class__.__name__}") from None
        items = sorted(data["data"], key=lambda item: item["index"])
        return [float(item["probs"][0]) for item in items]

    async def ready(self) -> bool:
        try:
            async with self._session.get(f"{self._url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200 and self._tokenizer is not None
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        return None
