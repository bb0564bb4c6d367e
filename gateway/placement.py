"""Placing a policy version on vLLM, verified: load it into backends (or start its own
instance), check it answers the version's probe, and take it off again.

A LoRA version is loaded under a fresh name ``<served>@<version>`` (vLLM keys its prefix
cache by adapter name, so a name never stands for other weights), or, with
``swap.lora_loading: resolver``, vLLM's filesystem resolver loads it from the shared registry
volume on the first request naming the version. Verified means: ``/v1/models`` lists the
name, and the teacher-forced next-token log-probs after the version's probe prefixes match
what the trainer computed within ``probe_tolerance`` (mean nats, ``versioning.probe``);
"different from before" is not enough, since a wrong adapter differs too. Does not
know which version should be served, or when: that is ``gateway.swap`` following the
registry's pointers; ``gateway.slots`` knows which versions are loaded and drained.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from gateway.blue_green import Instances
from gateway.metrics import Metrics
from gateway.settings import Backend, SwapSettings
from gateway.vllm_admin import VerificationError, VLLMAdmin
from versioning.probe import Probe
from versioning.registry import Registry

log = logging.getLogger("gateway.swap")


class Placement:
    def __init__(
        self,
        admin: VLLMAdmin,
        registry: Registry,
        settings: SwapSettings,
        metrics: Metrics,
        instances: Instances | None,
    ) -> None:
        """``instances``: full versions' vLLM servers (None: full versions are refused)."""
        self._admin = admin
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self.instances = instances

    def adapter_name(self, backend: Backend, version: str) -> str:
        """admin loading: ``<served>@<version>``; the resolver: the version's directory name under its cache dir."""
        return version if self._settings.lora_loading == "resolver" else f"{backend.model}@{version}"

    async def load(self, version: str, probe: Probe, backends: Sequence[Backend]) -> dict[str, str]:
        """Load a LoRA version into ``backends`` and verify it: backend URL → adapter name, for those that passed."""
        path = self._registry.path("policy", version).resolve()
        results = await asyncio.gather(*(self._load_and_verify(b, version, path, probe) for b in backends))
        return {b.url: name for b, name in zip(backends, results, strict=True) if name is not None}

    async def start(self, version: str, probe: Probe) -> dict[str, str]:
        """Start (or reuse a draining) vLLM instance serving a full version and verify it; its route, or {}."""
        assert self.instances is not None, "full versions are refused"
        instance = await self.instances.ensure(version, self._registry.path("policy", version).resolve())
        served = await self._load_and_verify(Backend(url=instance.url, model=instance.served_name), version, None, probe)
        if served is None:
            await self.instances.stop(version)
            return {}
        return {instance.url: served}

    async def remove(self, version: str, backends: Sequence[Backend]) -> None:
        """Stop a full version's instance, or unload a LoRA version from ``backends`` (failures logged)."""
        if self.instances is not None and version in self.instances:
            await self.instances.stop(version)
            return
        for backend in backends:
            try:
                await self._admin.unload_adapter(backend, self.adapter_name(backend, version))
            except (aiohttp.ClientError, TimeoutError, VerificationError) as exc:
                log.warning("unloading %s from %s failed: %s", version, backend.url, exc)

    async def _load_and_verify(self, backend: Backend, version: str, path: Path | None, probe: Probe) -> str | None:
        """Load an adapter (``path``; None: the backend serves ``version`` as its model) and verify it; its name."""
        name = self.adapter_name(backend, version) if path is not None else backend.model
        s = self._settings
        try:
            diff = await self._admin.load_and_probe(backend, name, path, probe, s.lora_loading)
            self._metrics.swap_probe_diff.labels(backend.url).set(diff)
            if diff > s.probe_tolerance:
                raise VerificationError(f"probe log-probs differ by {diff:.4f} nats per token (tolerance {s.probe_tolerance})")
            log.info("backend %s serves %s (probe diff %.2e)", backend.url, name, diff)
            return name
        except (VerificationError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            log.error("backend %s failed to load or verify %s: %s", backend.url, name, exc)
            self._metrics.swap_backend_failures.labels(backend.url).inc()
            return None
