"""A gateway app on fakes, driven through FastAPI's TestClient (and the openai SDK on top)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeGenerator, FakeScorer, FakeStore

LOCAL = ("127.0.0.1", 50000)
"""TestClient's peer address: a caller on the gateway's host (its default, ``testclient``, is no address)."""
ANSWERS = ["Ugh. 7.", "Sure! 3 plus 4 is 7.", "7.", "The answer is 9."]
REWARDS = {"Ugh. 7.": -1.0, "Sure! 3 plus 4 is 7.": 2.5, "7.": 1.0, "The answer is 9.": -2.0}


def settings(**overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "backends": [{"url": "http://127.0.0.1:9", "model": "policy"}], "n_candidates": 4,
        "warmup": False,  # fakes need none, and a warm-up request would be one more call to count (tests/gateway/test_warmup.py)
    }  # fmt: skip
    return GatewaySettings(**{**base, **overrides})


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make_client(tmp_path: Path, store: FakeStore) -> Iterator[Callable[..., TestClient]]:
    """Clients on fakes; the log goes to the ``store`` fixture (data dir under ``tmp_path``)."""
    clients: list[TestClient] = []

    def make(
        generator: FakeGenerator | None = None,
        scorer: FakeScorer | None = None,
        scorer_settings: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> TestClient:
        """``scorer``: the fake reward model; ``scorer_settings``: the settings' ``scorer`` section."""
        if scorer_settings is not None:
            overrides["scorer"] = scorer_settings
        overrides.setdefault("store", {})
        overrides["store"] = {"data_dir": str(tmp_path / "data"), "flush_interval_ms": 5, **overrides["store"]}
        app = create_app(
            settings(**overrides),
            generator=generator or FakeGenerator(ANSWERS),
            scorer=scorer or FakeScorer(REWARDS),
            store=store,
        )
        client = TestClient(app, raise_server_exceptions=False, client=LOCAL)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()
