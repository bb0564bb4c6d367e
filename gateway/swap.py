"""Hot-swap: follow the registry's ``current`` policy pointer into every vLLM backend, verified.

Knows the swap protocol for LoRA versions on running vLLM servers (runtime LoRA on):
1. notice that the pointer names another version (polling the pointer file; the
   registry's pointers are the single source of truth, the trainer never calls vLLM);
2. check the version's files against its manifest (a damaged version is never loaded);
3. load it into each backend under a fresh name ``<served>@<version>`` (vLLM keys its
   prefix cache by adapter name, so a name is never reused for other weights), or, with
   ``swap.lora_loading: resolver``, let vLLM's filesystem LoRA resolver load it from the
   shared registry volume on the first request naming the version;
4. verify on each backend: ``/v1/models`` lists the name, and the teacher-forced
   next-token log-probs after the version's fixed probe prefixes match the values the
   trainer computed for it within ``probe_tolerance`` (mean nats, ``versioning.probe``);
   "different from before" is not enough, since a wrong adapter differs too;
5. route new requests to the backends that passed (a backend that failed is not routed to
   until it passes; if none passed, the old route stays and the swap is retried later);
6. unload versions that are neither routed nor the previous one (the rollback target)
   once requests that may still use them have finished (``drain_s``);
7. keep at most ``max_live_adapters`` versions loaded per backend: a swap that would load
   one more first unloads the rollback target if it has drained, else waits (the old
   version keeps serving) until a draining version is unloaded; it never unloads a version
   that requests may still be using.
A request keeps the route it started with (``Route`` is immutable), so a swap never
fails a request in flight.

Canary: the ``canary`` pointer's version is loaded and verified the same way (counted in
the live bound; a backend that fails to verify it is retried during the trial) and answers
the share ``canary.fraction`` of requests, chosen by a hash of
the version and the request's sticky key (its ``user``, else its API key), so a user stays
on one version for the whole trial, on every replica. When the pointer is cleared the
canary drains and is unloaded (rolled back); when ``current`` moves to it (promoted) its
route becomes the current route as it is, without loading it again. The decision is
``gateway.canary``'s, or a person's; this module only follows the pointers.

Full fine-tunes (``format: full``) swap blue-green (``swap.full: blue_green``): a new vLLM
instance is started on the version's directory (``gateway.blue_green``), verified with the
same probe, routed to alone, and the instance it replaced is stopped after ``drain_s``.
LoRA versions keep being served by the configured backends, so a rollback from a full
version to a LoRA one (the rollback target stays loaded) is immediate. If a routed full
instance dies, new requests go to the rollback target (else the base) and it is started
again. ``swap.full: refuse`` leaves full versions unserved (counted as ``registry``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from gateway.blue_green import Instances, Launcher, VLLMStartError
from gateway.metrics import Metrics
from gateway.routing import Route, in_canary
from gateway.settings import Backend, SwapSettings
from gateway.vllm_admin import VerificationError, VLLMAdmin
from versioning.probe import Probe
from versioning.registry import Pointer, Registry, RegistryError

log = logging.getLogger("gateway.swap")


class Swapper:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        backends: Sequence[Backend],
        base_version: str,
        settings: SwapSettings,
        registry_dir: Path,
        metrics: Metrics,
        launch: Launcher | None = None,
        canary_fraction: float = 0.0,
    ) -> None:
        """``launch`` starts a vLLM instance for a full version (None: full versions are refused);
        ``canary_fraction``: the share of sticky keys the canary version answers."""
        self._admin = VLLMAdmin(session, settings.admin_timeout_s)
        self._backends = list(backends)
        self._base = Route(base_version, {b.url: b.model for b in self._backends})
        self.route = self._base
        self.canary: Route | None = None
        """The canary pointer's version, verified and answering ``canary_fraction`` of keys; None: no trial."""
        self._canary_fraction = canary_fraction
        self._settings = settings
        self._registry = Registry(registry_dir)
        self._metrics = metrics
        self._retired: dict[str, float] = {}
        """Adapter version → when it stopped being routed."""
        self._previous: str | None = None
        self._failed: dict[str, float] = {}
        """Version → when its last swap attempt failed (retried after ``retry_s``)."""
        self._waiting: str | None = None
        """A version whose swap waits for an adapter slot (logged and counted once)."""
        self._instances = Instances(launch) if launch is not None else None
        """Full versions' vLLM instances (routed or draining); None: full versions are refused."""
        self._formats: dict[str, str] = {}
        """Version → its format (lora, full), for every version routed since start."""
        self._routes: dict[str, Route] = {}
        """Version → the route it was served with (the fallback when a routed full instance dies)."""

    # ---- the loop ----
    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one failure; the reason is logged and counted
                log.exception("swap check failed")
            await asyncio.sleep(self._settings.poll_s)

    async def sync(self) -> None:
        """One check of the pointers; swaps (or retries unverified backends) when needed."""
        target = await asyncio.to_thread(self._target, "current")
        target_version = target if target is not None else self._base.version
        await self._reap()
        await self._unload_drained()
        if target_version != self.route.version:
            if self._due(target_version):
                await self._swap(target)
        elif target is not None:
            await self._add_backends(self.route)
        await self._sync_canary()

    def route_for(self, key: str) -> Route:
        """The route of a request with this sticky key (its ``user``, else its API key)."""
        canary = self.canary
        if canary is not None and in_canary(key, canary.version, self._canary_fraction):
            return canary
        return self.route

    async def close(self) -> None:
        """Stop the vLLM instances this swapper started (the gateway is shutting down)."""
        if self._instances is not None:
            await self._instances.stop_all()

    def _target(self, pointer: Pointer) -> str | None:
        return self._registry.version_at("policy", pointer)

    # ---- swapping ----
    async def _swap(self, version: str | None) -> None:
        started = time.perf_counter()
        old = self.route
        if version is None:  # the pointer was removed: back to the base model
            new, kind = self._base, "base"
        elif self.canary is not None and self.canary.version == version:  # the canary was promoted: already verified
            new, kind = self.canary, self._formats[version]
            self.canary = None
            self._metrics.set_canary(None)
        else:
            prepared = await self._prepare(version)
            if prepared is None:
                return
            new, kind = prepared
        self._route_to(new)
        seconds = time.perf_counter() - started
        self._metrics.swaps.labels("ok").inc()
        self._metrics.swap_seconds.labels(kind).observe(seconds)
        log.warning("policy %s -> %s (%s) on %d backend(s) in %.2f s", old.version, new.version, kind, len(new.models), seconds)

    async def _prepare(self, version: str) -> tuple[Route, str] | None:
        """Check, load (or start) and verify ``version``: its route and format, or None (failure logged and counted)."""
        try:
            manifest = await asyncio.to_thread(self._registry.verify, "policy", version)
            kind = manifest.format
            if kind == "full" and self._instances is None:
                raise RegistryError(f"policy {version} is a full model and swap.full is refuse")
            if kind not in ("lora", "full"):
                raise RegistryError(f"policy {version} has format {kind!r}; only lora and full versions are served")
            probe = await asyncio.to_thread(Probe.load, self._registry.path("policy", version))
        except (RegistryError, OSError, ValueError) as exc:
            self._fail(version, "registry", str(exc))
            return None
        if kind == "lora" and not await self._room_for(version):
            return None
        if kind == "full":
            try:
                models = await self._start(version, probe)
            except VLLMStartError as exc:
                self._fail(version, "launch", str(exc))
                return None
        else:
            models = await self._load_everywhere(version, probe, self._backends)
        if not models:
            self._fail(version, "verification", "no backend verified it")
            return None
        self._formats[version] = kind
        self._retired.pop(version, None)
        return Route(version, models), kind

    async def _sync_canary(self) -> None:
        """Follow the canary pointer: start a trial, or end one (rolled back: drain; promoted: already routed)."""
        target = await asyncio.to_thread(self._target, "canary")
        if target == self.route.version:
            target = None  # promoted, or pointed at what everyone gets anyway
        trial = self.canary
        if trial is not None and trial.version != target:
            self.canary = None
            if trial.version != self.route.version:
                self._retired[trial.version] = time.monotonic()  # drains, then unloaded like any unrouted version
                log.warning("canary %s ended: no longer routed (unloaded after drain)", trial.version)
            self._metrics.set_canary(None)
        if self.canary is not None and self.canary.version == target:
            await self._add_backends(self.canary)  # retried during the trial, as for current
            return
        if target is None or (self.canary is not None) or not self._due(target):
            return
        started = time.perf_counter()
        prepared = await self._prepare(target)
        if prepared is None:
            return
        self.canary, kind = prepared
        self._routes[target] = self.canary
        self._metrics.set_canary(target)
        log.warning(
            "canary %s (%s) answers %.0f%% of users on %d backend(s), ready in %.2f s",
            target, kind, 100 * self._canary_fraction, len(self.canary.models), time.perf_counter() - started,
        )  # fmt: skip

    def _route_to(self, new: Route) -> None:
        old = self.route
        self.route = new
        if old.version != new.version and old is not self._base:
            self._retired[old.version] = time.monotonic()
            if self._formats.get(old.version) == "lora":
                self._previous = old.version  # a full version is not kept: rolling back to it starts it again
        if new.version == self._previous:
            self._previous = None  # routed again (a rollback, or the fallback when a full instance died)
        self._retired.pop(new.version, None)
        self._failed.pop(new.version, None)
        if new is not self._base:
            self._routes[new.version] = new
        self._metrics.set_versions(policy=new.version)

    async def _add_backends(self, route: Route) -> None:
        """Retry the backends that failed to verify a LoRA version routed as current or as the canary."""
        version = route.version
        backends = [b for b in self._backends if b.url not in route.models]
        if not backends or self._formats.get(version) != "lora" or not self._due(version):
            return
        try:
            probe = await asyncio.to_thread(Probe.load, self._registry.path("policy", version))
        except (RegistryError, OSError, ValueError):
            return
        added = await self._load_everywhere(version, probe, backends)
        if added:
            route = self._routes[version] = Route(version, {**route.models, **added})
            if self.route.version == version:
                self.route = route
            if self.canary is not None and self.canary.version == version:
                self.canary = route
        if len(added) < len(backends):
            self._failed[version] = time.monotonic()

    def _due(self, version: str) -> bool:
        """Whether a swap to ``version`` may be tried now (never failed, or failed ``retry_s`` ago)."""
        return time.monotonic() - self._failed.get(version, -1e9) >= self._settings.retry_s

    def _fail(self, version: str, reason: str, message: str) -> None:
        self._failed[version] = time.monotonic()
        self._metrics.swaps.labels(reason).inc()
        log.error("not swapping to policy %s (%s): %s; still serving %s", version, reason, message, self.route.version)

    async def _load_everywhere(self, version: str, probe: Probe, backends: Sequence[Backend]) -> dict[str, str]:
        path = self._registry.path("policy", version).resolve()
        results = await asyncio.gather(*(self._load_and_verify(b, version, path, probe) for b in backends))
        return {b.url: name for b, name in zip(backends, results, strict=True) if name is not None}

    def adapter_name(self, backend: Backend, version: str) -> str:
        """admin loading: ``<served>@<version>``; the resolver: the version's directory name under its cache dir."""
        return version if self._settings.lora_loading == "resolver" else f"{backend.model}@{version}"

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

    # ---- blue-green (full versions) ----
    async def _start(self, version: str, probe: Probe) -> dict[str, str]:
        """Start (or reuse a draining) vLLM instance serving a full version and verify it; its route, or {}."""
        assert self._instances is not None  # checked by _prepare
        instance = await self._instances.ensure(version, self._registry.path("policy", version).resolve())
        served = await self._load_and_verify(Backend(url=instance.url, model=instance.served_name), version, None, probe)
        if served is None:
            await self._instances.stop(version)
            return {}
        return {instance.url: served}

    async def _reap(self) -> None:
        """Notice instances that died; if it was the routed one, route to the rollback target (else the base)."""
        if self._instances is None:
            return
        for version, code in self._instances.exited():
            if self.canary is not None and version == self.canary.version:
                log.error("the vLLM instance of canary %s exited with code %s; trial paused until it starts again", version, code)
                self._metrics.swaps.labels("died").inc()
                self.canary = None
                self._failed[version] = time.monotonic()
            elif version == self.route.version:
                fallback = self._routes.get(self._previous or "", self._base)
                log.error(
                    "the vLLM instance of policy %s exited with code %s; serving %s until it is started again",
                    version, code, fallback.version,
                )  # fmt: skip
                self._metrics.swaps.labels("died").inc()
                self._route_to(fallback)
            else:
                log.warning("the draining vLLM instance of policy %s exited with code %s", version, code)
            await self._instances.stop(version)  # its engine-core child may still be alive
            self._retired.pop(version, None)
            self._routes.pop(version, None)

    # ---- retiring ----
    def live(self) -> set[str]:
        """Adapter versions loaded on the backends: the routed one, the canary, the rollback target and those draining."""
        versions = set(self._retired) | ({self.route.version} if self.route is not self._base else set())
        if self.canary is not None:
            versions.add(self.canary.version)
        return {v for v in versions if self._formats.get(v) == "lora"}

    async def _room_for(self, version: str) -> bool:
        """Whether loading ``version`` keeps within ``max_live_adapters``; may unload a drained rollback target."""
        live = self.live()
        if version in live or len(live) < self._settings.max_live_adapters:
            return True
        previous = self._previous
        if previous is not None and self._drained(previous):
            log.warning("unloading the rollback target %s to make room for %s (max_live_adapters)", previous, version)
            self._previous = None
            await self._unload(previous)
            if len(self.live()) < self._settings.max_live_adapters:
                return True
        if self._waiting != version:
            self._waiting = version
            self._metrics.swaps.labels("waiting").inc()
            log.warning(
                "policy %s waits for an adapter slot: %d live (%s), max_live_adapters %d; %s keeps serving",
                version, len(live), ", ".join(sorted(live)), self._settings.max_live_adapters, self.route.version,
            )  # fmt: skip
        return False

    def _drained(self, version: str) -> bool:
        """Whether ``version`` is unrouted and requests that may use it are done (never true for the routed one)."""
        return version in self._retired and time.monotonic() - self._retired[version] >= self._settings.drain_s

    async def _unload_drained(self) -> None:
        for version in list(self._retired):
            if version != self._previous and self._drained(version):
                await self._unload(version)  # the rollback target stays loaded while there is room

    async def _unload(self, version: str) -> None:
        self._retired.pop(version, None)
        if self._instances is not None and version in self._instances:
            await self._instances.stop(version)
            return
        for backend in self._backends:
            try:
                await self._admin.unload_adapter(backend, self.adapter_name(backend, version))
            except (aiohttp.ClientError, TimeoutError, VerificationError) as exc:
                log.warning("unloading %s from %s failed: %s", version, backend.url, exc)
        self._routes.pop(version, None)
