"""Hot-swap: follow the registry's ``current`` and ``canary`` policy pointers into vLLM, verified.

For each move of a pointer (polled: the registry's pointer files are the single source of
truth, the trainer never calls vLLM):
1. check the version's files against its manifest (a damaged version is never loaded);
2. place it: load a LoRA version into every backend (runtime LoRA on), or start a full
   version's own vLLM instance (blue-green, ``swap.full``), and verify that it answers its
   probe (``gateway.placement``);
3. route new requests to the backends that passed (one that failed is retried; if none
   passed, the old route stays and the swap is retried after ``retry_s``);
4. take unrouted versions off once drained, keeping the rollback target loaded while there
   is room within ``max_live_adapters`` (``gateway.slots``): a swap that needs a slot waits,
   the old version serving, rather than unload a version requests may still be using.
A request keeps the route it started with (``Route`` is immutable), so a swap never fails a
request in flight.

Canary: the ``canary`` pointer's version is placed the same way (counted in the bound; its
failed backends retried during the trial) and answers the share ``canary.fraction`` of
sticky keys (``gateway.routing``), so a user stays on one version for the whole trial, on
every replica. Pointer cleared: the canary drains and is unloaded (rolled back); ``current``
moved to it (promoted): its route becomes the current route as it is, without loading it
again. The decision is ``gateway.canary``'s, or a person's; this module follows pointers.

Full versions: the instance a new version replaced is stopped after ``drain_s`` (not kept
for rollback; a LoRA rollback target stays loaded, so rolling back to it is immediate). If a
routed instance dies, new requests go to the rollback target (else the base) until it is
started again. ``swap.full: refuse`` leaves full versions unserved (counted as ``registry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from gateway.blue_green import Instances, Launcher, VLLMStartError
from gateway.metrics import Metrics
from gateway.placement import Placement
from gateway.routing import Route, in_canary
from gateway.settings import Backend, SwapSettings
from gateway.slots import Slots
from gateway.vllm_admin import VLLMAdmin
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
        on_backend_gone: Callable[[str], None] = lambda url: None,
    ) -> None:
        """``launch`` starts a vLLM instance for a full version (None: full versions are refused);
        ``canary_fraction``: the share of sticky keys the canary version answers; ``on_backend_gone``: told the URL of
        each blue-green instance stopped."""
        self._backends = list(backends)
        self._base = Route(base_version, {b.url: b.model for b in self._backends})
        self.route = self._base
        self.canary: Route | None = None
        """The canary pointer's version, verified and answering ``canary_fraction`` of keys; None: no trial."""
        self._canary_fraction = canary_fraction
        self._settings = settings
        self._registry = Registry(registry_dir)
        self._metrics = metrics
        self._placement = Placement(
            VLLMAdmin(session, settings.admin_timeout_s), self._registry, settings, metrics,
            Instances(launch, on_backend_gone) if launch is not None else None,
        )  # fmt: skip
        self.slots = Slots(settings.drain_s)
        self._failed: dict[str, float] = {}
        """Version → when its last swap attempt failed (retried after ``retry_s``)."""
        self._waiting: str | None = None
        """A version whose swap waits for an adapter slot (logged and counted once)."""
        self._routes: dict[str, Route] = {}
        """Version → the route it was served with (the fallback when a routed full instance dies)."""
        self._wake = asyncio.Event()

    # ---- the loop ----
    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one failure; the reason is logged and counted
                log.exception("swap check failed")
            with contextlib.suppress(TimeoutError):  # ``lost`` wakes it early
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_s)
            self._wake.clear()

    def lost(self, url: str, model: str) -> bool:
        """vLLM at ``url`` answered that it does not have ``model`` (it restarted, or another replica unloaded the
        adapter): take that backend out of the routes serving the LoRA version of that name; the next check loads and
        verifies it again. False: not a routed adapter (the base, a full version's instance: nothing to reload)."""
        handled = False
        for route in (self.route, self.canary):
            if route is None or route is self._base or route.models.get(url) != model:
                continue
            if self.slots.formats.get(route.version) != "lora":
                continue
            handled = True
            fewer = Route(route.version, {u: m for u, m in route.models.items() if u != url})
            self._routes[route.version] = fewer
            if self.route is route:
                self.route = fewer
            if self.canary is route:
                self.canary = fewer
            self._failed.pop(route.version, None)  # due at once
            self._metrics.swap_backend_failures.labels(url).inc()
            log.error("backend %s lost %s (vLLM does not have it): taken out of the route, loading it again", url, model)
            self._wake.set()
        return handled

    async def sync(self) -> None:
        """One check of the pointers; swaps (or retries unverified backends) when needed."""
        target = await asyncio.to_thread(self._target, "current")
        target_version = target if target is not None else self._base.version
        await self._reap()
        for version in self.slots.unneeded():
            await self._unload(version)
        if target_version != self.route.version:
            if self._due(target_version):
                await self._swap(target)
        elif target is not None:
            await self._add_backends(self.route)
        await self._sync_canary()

    def hold(self, version: str) -> None:
        """A request starts on ``version``: it is not taken off (unloaded, its instance stopped) until ``release``."""
        self.slots.begin(version)

    def release(self, version: str) -> None:
        self.slots.end(version)

    def route_for(self, key: str) -> Route:
        """The route of a request with this sticky key (its ``user``, else its API key)."""
        canary = self.canary
        if canary is not None and in_canary(key, canary.version, self._canary_fraction):
            return canary
        return self.route

    def on_trial(self) -> bool:
        """Whether a canary version is on trial (answering its share of keys) now."""
        return self.canary is not None

    def live(self) -> set[str]:
        """Adapter versions loaded on the backends: the routed one, the canary, the rollback target and those draining."""
        serving = [r.version for r in (self.route, self.canary) if r is not None and r is not self._base]
        return self.slots.live(serving)

    async def close(self) -> None:
        """Stop the vLLM instances this swapper started (the gateway is shutting down)."""
        if self._placement.instances is not None:
            await self._placement.instances.stop_all()

    def _target(self, pointer: Pointer) -> str | None:
        return self._registry.version_at("policy", pointer)

    # ---- swapping ----
    async def _swap(self, version: str | None) -> None:
        started = time.perf_counter()
        old = self.route
        if version is None:  # the pointer was removed: back to the base model
            new, kind = self._base, "base"
        elif self.canary is not None and self.canary.version == version:  # the canary was promoted: already verified
            new, kind = self.canary, self.slots.formats[version]
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
            if kind == "full" and self._placement.instances is None:
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
                models = await self._placement.start(version, probe)
            except VLLMStartError as exc:
                self._fail(version, "launch", str(exc))
                return None
        else:
            models = await self._placement.load(version, probe, self._backends)
        if not models:
            self._fail(version, "verification", "no backend verified it")
            return None
        self.slots.prepared(version, kind)
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
                self.slots.retire(trial.version)  # drains, then unloaded like any unrouted version
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
        self.slots.routed(None if old is self._base else old.version, new.version)
        self._failed.pop(new.version, None)
        if new is not self._base:
            self._routes[new.version] = new
        self._metrics.set_versions(policy=new.version)

    async def _add_backends(self, route: Route) -> None:
        """Retry the backends that failed to verify a LoRA version routed as current or as the canary."""
        version = route.version
        backends = [b for b in self._backends if b.url not in route.models]
        if not backends or self.slots.formats.get(version) != "lora" or not self._due(version):
            return
        try:
            probe = await asyncio.to_thread(Probe.load, self._registry.path("policy", version))
        except (RegistryError, OSError, ValueError):
            return
        added = await self._placement.load(version, probe, backends)
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

    async def _reap(self) -> None:
        """Notice full versions' instances that died; if it was the routed one, route to the rollback target (else the base)."""
        instances = self._placement.instances
        if instances is None:
            return
        for version, code in instances.exited():
            if self.canary is not None and version == self.canary.version:
                log.error("the vLLM instance of canary %s exited with code %s; trial paused until it starts again", version, code)
                self._metrics.swaps.labels("died").inc()
                self.canary = None
                self._failed[version] = time.monotonic()
            elif version == self.route.version:
                fallback = self._routes.get(self.slots.previous or "", self._base)
                log.error(
                    "the vLLM instance of policy %s exited with code %s; serving %s until it is started again",
                    version, code, fallback.version,
                )  # fmt: skip
                self._metrics.swaps.labels("died").inc()
                self._route_to(fallback)
            else:
                log.warning("the draining vLLM instance of policy %s exited with code %s", version, code)
            await instances.stop(version)  # its engine-core child may still be alive
            self.slots.forget(version)
            self._routes.pop(version, None)

    # ---- adapter slots ----
    async def _room_for(self, version: str) -> bool:
        """Whether loading ``version`` keeps within ``max_live_adapters``; may unload a drained rollback target."""
        live = self.live()
        limit = self._settings.max_live_adapters
        if version in live or len(live) < limit:
            return True
        previous = self.slots.previous
        if previous is not None and self.slots.drained(previous):
            log.warning("unloading the rollback target %s to make room for %s (max_live_adapters)", previous, version)
            self.slots.previous = None
            await self._unload(previous)
            if len(self.live()) < limit:
                return True
        if self._waiting != version:
            self._waiting = version
            self._metrics.swaps.labels("waiting").inc()
            log.warning(
                "policy %s waits for an adapter slot: %d live (%s), max_live_adapters %d; %s keeps serving",
                version, len(live), ", ".join(sorted(live)), limit, self.route.version,
            )  # fmt: skip
        return False

    async def _unload(self, version: str) -> None:
        self.slots.forget(version)
        await self._placement.remove(version, self._backends)
        self._routes.pop(version, None)
