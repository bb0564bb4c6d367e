"""Following the registry's reward-model pointer (``gateway.reward_follow``) on fakes, and the service
recording the reward model that actually scored a request when the scorer is swapped mid-request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.metrics import Metrics
from gateway.reward_follow import RewardModelFollower
from gateway.score import Conversation, Scorer
from tests.gateway.conftest import REWARDS
from tests.gateway.fakes import FakeScorer, FakeStore
from tests.gateway.test_log import MESSAGES, completions
from versioning.registry import Registry


class NamedScorer(FakeScorer):
    def __init__(self, version: str, path: Path | None = None, on_score: Callable[[], None] | None = None) -> None:
        super().__init__(REWARDS)
        self.version = version
        self.path = path
        self.on_score = on_score
        self.closed = False

    async def score(self, conversations: Sequence[Conversation], *, background: bool = False) -> list[float]:
        if self.on_score is not None:
            self.on_score()
        return await super().score(conversations)

    async def close(self) -> None:
        self.closed = True


@dataclass
class Service:
    scorer: Scorer | None


def publish_rm(registry: Registry, content: bytes = b"rm-weights") -> str:
    def write(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(content)
        (directory / "config.json").write_text(json.dumps({"num_labels": 1}))

    version = registry.publish("reward_model", write, format="full", parent=None, algorithm="bradley-terry").version
    registry.set_pointer("reward_model", "current", version, reason="test")
    return version


def follower(tmp_path: Path, service: Service, made: list[NamedScorer], fail: bool = False) -> RewardModelFollower:
    def make(path: Path, version: str) -> Scorer:
        if fail:
            raise OSError("cannot read the weights")
        scorer = NamedScorer(version, path)
        made.append(scorer)
        return scorer

    return RewardModelFollower(service, make, tmp_path / "base-rm", "rm-base", tmp_path / "registry", Metrics(), poll_s=1,
                               retry_s=3600, grace_s=0)  # fmt: skip


def test_a_new_reward_model_version_replaces_the_scorer_and_the_old_one_is_closed(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path / "registry")
        old = NamedScorer("rm-base")
        service = Service(old)
        made: list[NamedScorer] = []
        follow = follower(tmp_path, service, made)
        await follow.sync()
        assert service.scorer is old  # no pointer: the configured model stays
        version = publish_rm(registry)
        await follow.sync()
        assert service.scorer is made[0]
        assert made[0].version == version
        assert made[0].path == registry.path("reward_model", version)
        await asyncio.sleep(0.05)
        assert old.closed  # after its grace period
        registry.clear_pointer("reward_model", "current")  # back to the configured model
        await follow.sync()
        assert service.scorer is made[1]
        assert made[1].version == "rm-base"
        assert made[1].path == tmp_path / "base-rm"

    asyncio.run(test())


def test_a_damaged_or_unloadable_version_leaves_the_old_scorer(tmp_path: Path) -> None:
    async def test() -> None:
        registry = Registry(tmp_path / "registry")
        old = NamedScorer("rm-base")
        service = Service(old)
        version = publish_rm(registry)
        (registry.path("reward_model", version) / "model.safetensors").write_bytes(b"tampered")
        made: list[NamedScorer] = []
        await follower(tmp_path, service, made).sync()
        assert service.scorer is old
        assert made == []
        publish_rm(registry, b"fine")
        await follower(tmp_path, service, made, fail=True).sync()
        assert service.scorer is old
        assert not old.closed

    asyncio.run(test())


def test_a_request_records_the_reward_model_that_scored_it(make_client: Callable[..., TestClient], store: FakeStore) -> None:
    new = NamedScorer("rm-new")
    swapping = NamedScorer("rm-old")
    client = make_client(scorer=swapping)
    service = client.app.state.gateway.service  # type: ignore[attr-defined]
    swapping.on_score = lambda: setattr(service, "scorer", new)  # the follower switches while this request scores
    client.post("/v1/chat/completions", json={"model": "toy-bon", "messages": MESSAGES})
    client.post("/v1/chat/completions", json={"model": "toy-bon", "messages": MESSAGES})
    records = completions(store.wait_for(lambda rs: len(completions(rs)) == 2))
    assert sorted(r.rm_version or "" for r in records) == ["rm-new", "rm-old"]


def test_a_remote_scorer_follows_once_the_pooling_server_serves_the_version(tmp_path: Path, test_models: Path) -> None:
    """scorer.kind remote: the gateway cannot load weights into the pooling server; it switches when the server
    lists the version's name (a rollout), scores with that name and the version's tokenizer, and waits until then."""
    import shutil

    import aiohttp
    from aiohttp import web

    from gateway.lifespan import scorer_factory
    from gateway.settings import GatewaySettings
    from gateway.vllm_process import free_port

    served = ["reward"]
    asked: list[str] = []

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": name} for name in served]})

    async def classify(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body["model"])
        return web.json_response({"data": [{"index": i, "probs": [0.5]} for i in range(len(body["input"]))]})

    async def test() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/classify", classify)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        registry = Registry(tmp_path / "registry")

        def write(directory: Path) -> None:
            shutil.copytree(test_models / "reward_model", directory, dirs_exist_ok=True)

        version = registry.publish("reward_model", write, format="full", parent=None, algorithm="bradley-terry").version
        registry.set_pointer("reward_model", "current", version, reason="refit")
        settings = GatewaySettings(
            backends=[{"url": "http://127.0.0.1:9", "model": "policy"}],  # type: ignore[list-item]
            scorer={"kind": "remote", "remote_url": f"http://127.0.0.1:{port}", "remote_model": "reward"},  # type: ignore[arg-type]
        )
        try:
            async with aiohttp.ClientSession() as session:
                make = scorer_factory(settings, session)
                old = make(test_models / "reward_model", "rm-base")
                await old.start()
                service = Service(old)
                follow = RewardModelFollower(service, make, test_models / "reward_model", "rm-base", tmp_path / "registry",
                                             Metrics(), poll_s=1, retry_s=0, grace_s=0)  # fmt: skip
                await follow.sync()
                assert service.scorer is old  # the server does not serve the version yet
                served.append(version)  # rolled out
                await follow.sync()
                assert service.scorer is not None
                assert service.scorer.version == version
                await service.scorer.score([Conversation([{"role": "user", "content": "2+2?"}], "4")])
                assert asked == [version]
        finally:
            await runner.cleanup()

    asyncio.run(test())
