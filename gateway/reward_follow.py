"""Follow the registry's reward-model pointer: load the new reward model beside the old, then switch.

Knows how a gateway picks up a refit: it polls the ``reward_model`` ``current`` pointer
(``trainer.registry``; the trainer's ``--refit-reward-model`` moves it), checks the
version's files, starts a second scorer for it under the version's name (in-process
weights, or a pooling server that serves the version by name: ``gateway.app``), and
switches the service to it; the old one is closed after ``grace_s`` (requests that started
scoring with it finish with it, and their records name it). No pointer: the configured model under ``scorer.version``.
A version that fails to load is logged and retried later; the old model keeps scoring.
Rewards of two versions never meet in one request or record. Does not know the policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.metrics import Metrics
from gateway.score import Scorer
from versioning.registry import Registry, RegistryError

log = logging.getLogger("gateway.reward_follow")


class HasScorer(Protocol):
    scorer: Scorer | None


class RewardModelFollower:
    def __init__(
        self,
        service: HasScorer,
        make: Callable[[Path, str], Scorer],
        base_dir: Path,
        base_version: str,
        registry_dir: Path,
        metrics: Metrics,
        poll_s: float,
        retry_s: float = 30.0,
        grace_s: float = 60.0,
    ) -> None:
        self._service = service
        self._make = make
        self._base = (base_dir, base_version)
        self._registry = Registry(registry_dir)
        self._metrics = metrics
        self._poll_s = poll_s
        self._retry_s = retry_s
        self._grace_s = grace_s
        self._failed: dict[str, float] = {}
        self._closing: dict[asyncio.Task[None], Scorer] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one failure
                log.exception("reward-model check failed")
            await asyncio.sleep(self._poll_s)

    async def sync(self) -> None:
        current = self._service.scorer
        state = await asyncio.to_thread(self._registry.pointer, "reward_model", "current")
        version = state.version if state is not None else self._base[1]
        if current is None or version == current.version:
            return
        if time.monotonic() - self._failed.get(version, -1e9) < self._retry_s:
            return
        try:
            if state is None:
                path = self._base[0]
            else:
                manifest = await asyncio.to_thread(self._registry.verify, "reward_model", version)
                if manifest.format != "full":
                    raise RegistryError(f"reward model {version} is a {manifest.format} model; only full models load")
                path = self._registry.path("reward_model", version)
            new = self._make(path, version)
            await new.start()
        except Exception as exc:
            self._failed[version] = time.monotonic()
            log.error("not switching to reward model %s: %s: %s; %s keeps scoring", version, type(exc).__name__, exc,
                      current.version)  # fmt: skip
            return
        self._service.scorer = new
        self._metrics.set_versions(reward_model=version)
        log.warning("reward model %s -> %s", current.version, version)
        task = asyncio.create_task(self._close_later(current))
        self._closing[task] = current
        task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def _close_later(self, old: Scorer) -> None:
        await asyncio.sleep(self._grace_s)
        await old.close()

    async def close(self) -> None:
        """Close the old scorers still waiting out their grace period now (at shutdown)."""
        for task, old in list(self._closing.items()):
            task.cancel()
            await old.close()
