"""The inspector's admin reads on a real SQLite log (the app on fakes otherwise), and the page's guard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.auth import digest
from gateway.store.sql import SqlStore
from tests.gateway.conftest import ANSWERS, LOCAL, REWARDS, settings
from tests.gateway.fakes import FakeGenerator, FakeScorer
from tests.polling import wait_until
from versioning.registry import Registry

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is 3 plus 4?"}]


def app_on_sqlite(tmp_path: Path, **overrides: Any) -> tuple[TestClient, SqlStore]:
    db = tmp_path / "log.db"
    base: dict[str, Any] = {"store": {"url": f"sqlite:///{db}", "data_dir": str(tmp_path / "data"), "flush_interval_ms": 5}}
    app = create_app(
        settings(**{**base, "swap": {"registry_dir": str(tmp_path / "registry")}, **overrides}),
        generator=FakeGenerator(ANSWERS), scorer=FakeScorer(REWARDS),
    )  # fmt: skip
    client = TestClient(app, raise_server_exceptions=False, client=LOCAL)
    return client, SqlStore(f"sqlite:///{db}")


def test_recent_requests_show_every_candidate_its_reward_the_choice_and_the_thumb(tmp_path: Path) -> None:
    client, store = app_on_sqlite(tmp_path)
    with client:
        ids = [client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES}).json()["id"] for _ in range(3)]
        assert client.post("/v1/feedback", json={"completion_id": ids[1], "thumb": "up"}).status_code == 200
        wait_until(lambda: len(store.completion_ids()) == 3, 10, "the log")
        data = client.get("/admin/completions").json()["data"]
        assert [r["id"] for r in data] == ids[::-1]  # newest first
        [second] = [r for r in data if r["id"] == ids[1]]
        assert second["thumb"] == "up"
        assert [c["text"] for c in second["candidates"]] == ANSWERS
        assert [c["reward"] for c in second["candidates"]] == [REWARDS[a] for a in ANSWERS]
        assert [c["chosen"] for c in second["candidates"]] == [a == "Sure! 3 plus 4 is 7." for a in ANSWERS]
        assert client.get("/admin/completions", params={"limit": 1}).json()["data"][0]["id"] == ids[2]
        assert client.get("/admin/completions", params={"policy_version": "v9"}).json()["data"] == []
        assert client.get("/admin/completions", params={"status": "weird"}).status_code == 400
    store.close()


def test_versions_join_the_log_the_registry_and_the_gate(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    (registry / "policy").mkdir(parents=True)
    look = {"at": 1.0, "canary": "v0002", "current": "v0001", "action": "rollback", "reason": "worse", "by": "gate"}
    (registry / "policy" / "gate.jsonl").write_text(json.dumps(look) + "\n")
    client, store = app_on_sqlite(tmp_path)
    with client:
        for _ in range(2):
            client.post(CHAT, json={"model": "toy-bon", "messages": MESSAGES})
        wait_until(lambda: len(store.completion_ids()) == 2, 10, "the log")
        body = client.get("/admin/versions").json()
    [base] = body["data"]
    assert (base["version"], base["answers"], base["mean_reward"]) == ("base", 2, 2.5)  # the chosen: the best reward
    assert base["mean_length"] == 3.0  # FakeGenerator: candidate i has i + 2 tokens; the chosen is index 1
    assert body["looks"] == [look]
    assert Registry(registry).versions_dir("policy").parent == registry / "policy"
    store.close()


def test_the_reads_are_admin_only_and_the_page_is_served(make_client: Callable[..., TestClient]) -> None:
    keys = [{"id": "team", "sha256": digest("sk-team")}, {"id": "ops", "sha256": digest("sk-ops"), "scopes": ["admin"]}]
    client = make_client(api_keys=keys, admin_token="adm-token-0123456789")
    for path in ("/admin/completions", "/admin/versions", "/admin/loop.png"):
        assert client.get(path, headers={"authorization": "Bearer sk-team"}).status_code == 403
        assert client.get(path).status_code == 401
    past_the_guard = client.get("/admin/versions", headers={"authorization": "Bearer sk-ops"})  # a fake log: nothing to read
    assert (past_the_guard.status_code, past_the_guard.json()["error"]["code"]) == (404, "log_not_browsable")
    page = client.get("/ui")
    assert page.status_code == 200
    assert "bon-gateway inspector" in page.text
    assert "/admin/completions" in page.text  # the page calls the reads it is tested with
