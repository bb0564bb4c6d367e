"""The swapper against a fake vLLM admin API: verification, routing, draining and the live-adapter bound.

The fake serves an adapter's probe values from the ``probe.json`` in the directory it was
asked to load (what real weights would give), or wrong values when told to; it records
loads and unloads. The real vLLM path is ``tests/e2e/test_swap.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web

from gateway.blue_green import VLLMStartError
from gateway.metrics import Metrics
from gateway.routing import in_canary
from gateway.settings import Backend, SwapSettings
from gateway.swap import Swapper
from gateway.vllm_process import free_port
from versioning.probe import Probe
from versioning.registry import Pointer, Registry

PREFIXES = [[1, 2, 3], [1, 2, 3, 4, 5, 6]]


class FakeVLLM:
    """``/v1/models``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` and one-token ``/v1/completions``."""

    def __init__(
        self, base: str = "policy", wrong: bool = False, base_dir: Path | None = None, resolver_dir: Path | None = None
    ) -> None:
        self.base = base
        self.resolver_dir = resolver_dir
        """Like vLLM's filesystem LoRA resolver: a request naming an unknown adapter loads ``resolver_dir/<name>``."""
        self.wrong = wrong
        self.base_dir = base_dir
        """The model directory it serves as ``base`` (a full version's; its probe.json gives the values)."""
        self.loaded: dict[str, Path] = {}
        self.loads: list[str] = []
        self.unloaded: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/completions", self.complete)
        return app

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": name} for name in [self.base, *self.loaded]]})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["lora_name"] in self.loaded:
            return web.json_response({"error": "already loaded"}, status=400)
        self.loaded[body["lora_name"]] = Path(body["lora_path"])
        self.loads.append(body["lora_name"])
        return web.Response(text="ok")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if self.loaded.pop(name, None) is None:
            return web.json_response({"error": "not loaded"}, status=404)
        self.unloaded.append(name)
        return web.Response(text="ok")

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.resolver_dir is not None and body["model"] not in self.loaded and (self.resolver_dir / body["model"]).is_dir():
            self.loaded[body["model"]] = self.resolver_dir / body["model"]
        probe = Probe.load(self.base_dir if body["model"] == self.base and self.base_dir else self.loaded[body["model"]])
        top = probe.top[probe.prefixes.index(body["prompt"])]
        shift = 0.5 if self.wrong else 0.0
        logprobs = {f"token_id:{token}": value - shift for token, value in top.items()}
        return web.json_response({"choices": [{"logprobs": {"top_logprobs": [logprobs]}}]})


@asynccontextmanager
async def serving(fake: FakeVLLM) -> AsyncIterator[Backend]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Backend(url=f"http://127.0.0.1:{port}", model=fake.base)
    finally:
        await runner.cleanup()


def publish(registry: Registry, seed: int, format: Literal["lora", "full"] = "lora", pointer: Pointer | None = "current") -> str:
    def write(directory: Path) -> None:
        weights = "adapter_model.safetensors" if format == "lora" else "model.safetensors"
        (directory / weights).write_bytes(bytes([seed]) * 16)
        (directory / ("adapter_config.json" if format == "lora" else "config.json")).write_text(json.dumps({"r": 4}))
        top = [{str(seed): -0.1 * seed, str(seed + 1): -2.0} for _ in PREFIXES]
        Probe(prefixes=PREFIXES, top=top).save(directory)

    version = registry.publish("policy", write, format=format, parent=None, algorithm="dpo").version
    if pointer is not None:
        registry.set_pointer("policy", pointer, version, reason="test")
    return version


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_a_verified_version_is_routed_and_a_wrong_one_is_not(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        good, bad = FakeVLLM(), FakeVLLM(wrong=True)
        metrics = Metrics()
        async with serving(good) as b1, serving(bad) as b2, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [b1, b2], "base", SwapSettings(retry_s=0), tmp_path, metrics)
            v1 = publish(registry, 1)
            await swapper.sync()
            assert swapper.route.version == v1
            assert swapper.route.models == {b1.url: f"policy@{v1}"}  # the backend serving wrong values gets no traffic
            assert metrics.swap_backend_failures.labels(b2.url)._value.get() >= 1
            bad.wrong = False  # fixed: the next check adds it
            await swapper.sync()
            assert swapper.route.models == {b1.url: f"policy@{v1}", b2.url: f"policy@{v1}"}

    run(test)


def test_a_version_vllm_lost_is_taken_out_of_the_route_and_loaded_again(tmp_path: Path) -> None:
    """vLLM restarted (or another replica unloaded the adapter): the generator's 404 reaches ``lost``; the next check
    loads and verifies the version again, and the backend is routed to again."""

    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(), tmp_path, Metrics())
            v1 = publish(registry, 1)
            await swapper.sync()
            name = f"policy@{v1}"
            assert swapper.route.models == {backend.url: name}
            fake.loaded.clear()  # vLLM restarted: the adapter is gone
            assert not swapper.lost(backend.url, "policy@some-other-version")  # not what is routed: nothing changes
            assert not swapper.lost(backend.url, "policy")  # the base model: nothing to reload (a 502)
            assert swapper.route.models == {backend.url: name}
            assert swapper.lost(backend.url, name)
            assert swapper.route.version == v1
            assert swapper.route.models == {}  # no request is sent where the adapter is missing
            await swapper.sync()
            assert swapper.route.models == {backend.url: name}
            assert fake.loads == [name, name]

    run(test)


def test_a_damaged_version_is_never_loaded(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(), tmp_path, Metrics())
            version = publish(registry, 1)
            (registry.path("policy", version) / "adapter_model.safetensors").write_bytes(b"tampered")
            await swapper.sync()
            assert swapper.route.version == "base"
            assert fake.loaded == {}

    run(test)


@pytest.mark.parametrize("drain_s", [0.0, 3600.0])
def test_live_adapters_stay_within_the_bound(tmp_path: Path, drain_s: float) -> None:
    """max_live_adapters 2: routed + rollback target. A third version unloads a drained rollback target;
    while the target may still serve requests (drain_s not over) the swap waits and the old version serves."""

    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        metrics = Metrics()
        settings = SwapSettings(max_live_adapters=2, drain_s=drain_s, retry_s=0)
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", settings, tmp_path, metrics)
            versions = [publish(registry, 1)]
            await swapper.sync()
            versions.append(publish(registry, 2))
            await swapper.sync()
            assert swapper.route.version == versions[1]
            assert set(fake.loaded) == {f"policy@{v}" for v in versions}  # v1 kept as the rollback target
            versions.append(publish(registry, 3))
            await swapper.sync()
            assert len(fake.loaded) <= 2
            if drain_s == 0:
                assert swapper.route.version == versions[2]
                assert fake.unloaded == [f"policy@{versions[0]}"]
                assert set(fake.loaded) == {f"policy@{versions[1]}", f"policy@{versions[2]}"}
            else:
                assert swapper.route.version == versions[1]  # waits; nothing in use was unloaded
                assert fake.unloaded == []
                assert metrics.swaps.labels("waiting")._value.get() == 1
                swapper.slots.retired[versions[0]] = time.monotonic() - drain_s  # the drain period passes
                await swapper.sync()
                assert swapper.route.version == versions[2]
                assert set(fake.loaded) == {f"policy@{versions[1]}", f"policy@{versions[2]}"}

    run(test)


def test_the_bound_may_not_exceed_the_managed_vllm_slots() -> None:
    from gateway.settings import GatewaySettings

    with pytest.raises(ValueError, match=r"max_live_adapters 5 exceeds managed_vllm\.max_loras 4"):
        GatewaySettings(swap={"max_live_adapters": 5}, managed_vllm={"enabled": True, "max_loras": 4})  # type: ignore[arg-type]


class FakeInstance:
    """A blue-green instance: a fake vLLM serving a full version's directory under ``policy@<version>``."""

    def __init__(self, runner: web.AppRunner, url: str, served_name: str, fake: FakeVLLM) -> None:
        self._runner = runner
        self._loop = asyncio.get_running_loop()
        self.url = url
        self.served_name = served_name
        self.fake = fake
        self.code: int | None = None
        self.stopped = False

    def returncode(self) -> int | None:
        return self.code

    def stop(self) -> None:  # called in a worker thread, like VLLMProcess.stop
        if not self.stopped:
            self.stopped = True
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)


class FakeLauncher:
    def __init__(self) -> None:
        self.started: list[FakeInstance] = []
        self.wrong = False
        self.fail: str | None = None

    async def __call__(self, model_dir: Path, version: str) -> FakeInstance:
        if self.fail:
            raise VLLMStartError(self.fail)
        fake = FakeVLLM(base=f"policy@{version}", wrong=self.wrong, base_dir=model_dir)
        runner = web.AppRunner(fake.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        instance = FakeInstance(runner, f"http://127.0.0.1:{port}", fake.base, fake)
        self.started.append(instance)
        return instance


def test_full_versions_swap_blue_green_and_roll_back_to_the_loaded_adapter(tmp_path: Path) -> None:
    """LoRA v1 → full v2 (own instance) → full v3 (another; v2's stopped after drain) → rollback to v1:
    the adapter is still loaded, so no load and no start; v3's instance is stopped."""

    async def test() -> None:
        registry = Registry(tmp_path)
        fake, launch, metrics = FakeVLLM(), FakeLauncher(), Metrics()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(drain_s=0, retry_s=0), tmp_path, metrics, launch)
            v1 = publish(registry, 1)
            await swapper.sync()
            v2 = publish(registry, 2, "full")
            await swapper.sync()
            first = launch.started[0]
            assert swapper.route.version == v2
            assert swapper.route.models == {first.url: f"policy@{v2}"}  # only the instance serving v2
            assert set(fake.loaded) == {f"policy@{v1}"}  # the LoRA rollback target stays loaded
            assert swapper.live() == {v1}  # a full version takes no adapter slot

            v3 = publish(registry, 3, "full")
            await swapper.sync()
            second = launch.started[1]
            assert swapper.route.models == {second.url: f"policy@{v3}"}
            await swapper.sync()  # v2 drained (drain_s 0): its instance is stopped, not kept for rollback
            assert first.stopped
            assert not second.stopped

            registry.set_pointer("policy", "current", v1, reason="rollback")
            await swapper.sync()
            assert swapper.route.models == {backend.url: f"policy@{v1}"}
            assert fake.unloaded == []
            assert len(launch.started) == 2
            await swapper.sync()
            assert second.stopped
            assert metrics.swap_seconds.labels("full")._sum.get() > 0
            await swapper.close()

    run(test)


def test_a_full_version_that_fails_to_start_or_verify_is_not_routed(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake, launch, metrics = FakeVLLM(), FakeLauncher(), Metrics()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(retry_s=0), tmp_path, metrics, launch)
            v1 = publish(registry, 1)
            await swapper.sync()
            publish(registry, 2, "full")
            launch.wrong = True  # it starts, but serves other weights
            await swapper.sync()
            assert swapper.route.version == v1
            assert launch.started[0].stopped
            assert metrics.swaps.labels("verification")._value.get() == 1
            launch.wrong, launch.fail = False, "vLLM exited with code 1 while starting"
            await swapper.sync()
            assert swapper.route.version == v1
            assert metrics.swaps.labels("launch")._value.get() == 1

    run(test)


def test_when_the_routed_full_instance_dies_the_rollback_target_serves_until_it_is_back(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake, launch, metrics = FakeVLLM(), FakeLauncher(), Metrics()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(retry_s=0), tmp_path, metrics, launch)
            v1 = publish(registry, 1)
            await swapper.sync()
            v2 = publish(registry, 2, "full")
            await swapper.sync()
            launch.started[0].code = -9  # killed (OOM, say)
            launch.fail = "no memory"
            await swapper.sync()
            assert swapper.route.models == {backend.url: f"policy@{v1}"}
            assert metrics.swaps.labels("died")._value.get() == 1
            assert launch.started[0].stopped  # its engine-core child is cleaned up too
            launch.fail = None
            await swapper.sync()  # started again
            assert swapper.route.models == {launch.started[1].url: f"policy@{v2}"}
            await swapper.close()
            assert launch.started[1].stopped

    run(test)


def test_full_versions_are_refused_without_a_launcher(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake, metrics = FakeVLLM(), Metrics()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(), tmp_path, metrics)
            publish(registry, 1, "full")
            await swapper.sync()
            assert swapper.route.version == "base"
            assert metrics.swaps.labels("registry")._value.get() == 1

    run(test)


def test_gateways_sharing_backends_each_verify_and_route_the_version(tmp_path: Path) -> None:
    """Many replicas: every gateway follows the same registry and loads into the same vLLMs; whoever loads second
    (or at the same time) finds the adapter there, still checks its probe, and routes to it."""

    async def test() -> None:
        registry = Registry(tmp_path)
        fakes = [FakeVLLM(), FakeVLLM()]
        async with serving(fakes[0]) as b1, serving(fakes[1]) as b2, aiohttp.ClientSession() as session:
            gateways = [Swapper(session, [b1, b2], "base", SwapSettings(), tmp_path, Metrics()) for _ in range(3)]
            version = publish(registry, 1)
            await asyncio.gather(*(g.sync() for g in gateways))
            for gateway in gateways:
                assert gateway.route.models == {b1.url: f"policy@{version}", b2.url: f"policy@{version}"}
            assert all(set(fake.loaded) == {f"policy@{version}"} for fake in fakes)

    run(test)


def test_with_the_filesystem_resolver_the_gateway_loads_nothing_and_still_verifies(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM(resolver_dir=registry.versions_dir("policy"))
        load_calls: list[str] = []
        original = fake.load

        async def counting_load(request: web.Request) -> web.Response:
            load_calls.append("load")
            return await original(request)

        fake.load = counting_load  # type: ignore[method-assign]
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(lora_loading="resolver"), tmp_path, Metrics())
            version = publish(registry, 1)
            await swapper.sync()
            assert swapper.route.models == {backend.url: version}  # the version's directory name
            assert load_calls == []
            assert set(fake.loaded) == {version}
            fake.wrong = True  # a resolver that serves other weights is not trusted either
            v2 = publish(registry, 2)
            await swapper.sync()
            assert swapper.route.version == version
            assert v2 in fake.loaded

    run(test)


def test_a_canary_answers_its_share_of_users_sticky_on_every_replica_and_is_promoted_without_reloading(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        metrics = Metrics()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            replicas = [Swapper(session, [backend], "base", SwapSettings(), tmp_path, metrics, canary_fraction=0.2) for _ in "ab"]
            v1 = publish(registry, 1)
            v2 = publish(registry, 2, pointer="canary")
            for swapper in replicas:
                await swapper.sync()
            a, b = replicas
            assert a.route.version == v1
            assert a.canary is not None
            assert a.canary.version == v2
            assert a.live() == {v1, v2}  # the canary counts in the live-adapter bound
            keys = [f"user:{i}" for i in range(4000)]
            chosen = [a.route_for(key).version for key in keys]
            share = chosen.count(v2) / len(keys)
            assert 0.17 < share < 0.23  # binomial sd 0.006 at 0.2
            assert chosen == [b.route_for(key).version for key in keys]  # the same users on every replica
            assert chosen == [a.route_for(key).version for key in keys]  # and on every request
            assert set(chosen) == {v1, v2}
            assert metrics.registry.get_sample_value("bon_canary_version_info", {"version": v2}) == 1
            loads = list(fake.loads)
            registry.promote("policy")
            await a.sync()
            assert a.route.version == v2
            assert a.canary is None
            assert fake.loads == loads  # promoted as verified: not loaded again
            assert {a.route_for(key).version for key in keys} == {v2}
            assert metrics.registry.get_sample_value("bon_canary_version_info", {"version": "none"}) == 1

    run(test)


def test_a_rolled_back_canary_stops_answering_then_is_unloaded_after_drain(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(drain_s=0), tmp_path, Metrics(), canary_fraction=1.0)
            v1 = publish(registry, 1)
            v2 = publish(registry, 2, pointer="canary")
            await swapper.sync()
            assert swapper.route_for("key:k").version == v2
            registry.rollback("policy")  # drops the canary pointer
            await swapper.sync()
            assert swapper.canary is None
            assert swapper.route_for("key:k").version == v1
            await swapper.sync()
            assert fake.unloaded == [f"policy@{v2}"]
            assert set(fake.loaded) == {f"policy@{v1}"}

    run(test)


def test_a_version_with_a_request_in_flight_is_not_taken_off_until_the_request_is_over(tmp_path: Path) -> None:
    """drain_s 0 and a request still running on a version no longer routed (nor the rollback target): it stays loaded
    until the request ends (the blue-green instance of a full version was stopped under a request in flight: it failed)."""

    async def test() -> None:
        registry = Registry(tmp_path)
        fake = FakeVLLM()
        async with serving(fake) as backend, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [backend], "base", SwapSettings(drain_s=0, max_live_adapters=3), tmp_path, Metrics())
            v1 = publish(registry, 1)
            await swapper.sync()
            swapper.hold(v1)  # a request planned on v1 is still running
            publish(registry, 2)
            await swapper.sync()  # v2 routed; v1 is the rollback target
            v3 = publish(registry, 3)
            await swapper.sync()  # v3 routed; v2 the rollback target; v1 neither, drained but for its request
            await swapper.sync()
            assert swapper.route.version == v3
            assert f"policy@{v1}" not in fake.unloaded
            swapper.release(v1)
            await swapper.sync()
            assert fake.unloaded == [f"policy@{v1}"]

    run(test)


def test_a_backend_that_fails_to_verify_the_canary_is_retried_during_the_trial(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path)
        good, bad = FakeVLLM(), FakeVLLM()
        async with serving(good) as b1, serving(bad) as b2, aiohttp.ClientSession() as session:
            swapper = Swapper(session, [b1, b2], "base", SwapSettings(retry_s=0), tmp_path, Metrics(), canary_fraction=0.5)
            v1 = publish(registry, 1)
            await swapper.sync()
            assert set(swapper.route.models) == {b1.url, b2.url}
            bad.wrong = True
            v2 = publish(registry, 2, pointer="canary")
            await swapper.sync()
            assert swapper.canary is not None
            assert swapper.canary.models == {b1.url: f"policy@{v2}"}  # the trial runs on the backend that verified it
            bad.wrong = False
            await swapper.sync()
            assert swapper.canary.models == {b1.url: f"policy@{v2}", b2.url: f"policy@{v2}"}
            assert swapper.route.models == {b1.url: f"policy@{v1}", b2.url: f"policy@{v1}"}  # current untouched
            registry.promote("policy")
            await swapper.sync()
            assert swapper.route.version == v2
            assert set(swapper.route.models) == {b1.url, b2.url}  # promoted with both backends

    run(test)


def test_the_canary_share_is_a_stable_hash() -> None:
    assert not in_canary("user:a", "v0002", 0.0)
    assert in_canary("user:a", "v0002", 1.0)
    inside = [in_canary(f"key:{i}", "v0002", 0.5) for i in range(2000)]
    assert 0.45 < sum(inside) / len(inside) < 0.55
    # another trial draws another share of users (not always the same guinea pigs)
    assert inside != [in_canary(f"key:{i}", "v0003", 0.5) for i in range(2000)]
