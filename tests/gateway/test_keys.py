"""API keys: missing, wrong and revoked ones, and a key file that changes while the gateway runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.auth import digest
from gateway.errors import RateLimited
from gateway.keyfile import KeyFile, load_keys
from gateway.quotas import Quotas
from gateway.settings import ApiKey
from tests.polling import wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "toy-bon", "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def entry(key_id: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"id": key_id, "sha256": digest(key), **extra}


def error_code(response: Any) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_missing_wrong_and_revoked_keys_get_401_and_a_revoked_admin_key_is_no_admin(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(
        api_keys=[entry("live", "sk-live"), entry("gone", "sk-gone", revoked=True, scopes=["chat", "admin"])],
        admin_token="adm-token-0123456789",
    )  # fmt: skip
    assert client.post(CHAT, json=BODY, headers=bearer("sk-live")).status_code == 200
    missing, wrong, revoked = (client.post(CHAT, json=BODY, headers=h) for h in ({}, bearer("sk-nope"), bearer("sk-gone")))
    assert [r.status_code for r in (missing, wrong, revoked)] == [401, 401, 401]
    assert [error_code(r) for r in (missing, wrong, revoked)] == ["invalid_api_key", "invalid_api_key", "revoked_api_key"]
    assert client.post("/v1/feedback", json={"completion_id": "x", "thumb": "up"}, headers=bearer("sk-gone")).status_code == 401
    assert client.get("/admin/policy", headers=bearer("sk-gone")).status_code == 401
    assert client.get("/admin/policy", headers=bearer("adm-token-0123456789")).status_code == 200


def test_a_key_file_adds_rotates_and_revokes_keys_without_a_restart(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([entry("team", "sk-old")]))
    client = make_client(api_keys=[entry("ops", "sk-ops")], api_keys_file=str(path), keys_reload_s=0.05)
    assert client.post(CHAT, json=BODY, headers=bearer("sk-old")).status_code == 200
    assert client.post(CHAT, json=BODY, headers=bearer("sk-new")).status_code == 401

    # rotation: the new key in, the old one revoked, as a Secret update would write it
    path.write_text(yaml.safe_dump({"api_keys": [entry("team", "sk-old", revoked=True), entry("team-2", "sk-new")]}))
    wait_until(lambda: client.post(CHAT, json=BODY, headers=bearer("sk-new")).status_code == 200, 10, "the new key never worked")
    assert error_code(client.post(CHAT, json=BODY, headers=bearer("sk-old"))) == "revoked_api_key"
    assert client.post(CHAT, json=BODY, headers=bearer("sk-ops")).status_code == 200  # configured keys stay

    # a broken file changes nothing
    path.write_text("api_keys: [ {id: 1")
    with pytest.raises(AssertionError):  # nothing is reloaded: the new key keeps working all along
        wait_until(lambda: client.post(CHAT, json=BODY, headers=bearer("sk-new")).status_code != 200, 0.5)


def test_a_changed_rate_applies_at_once() -> None:
    quotas = Quotas([ApiKey(**entry("a", "sk-a", requests_per_minute=1))])
    quotas.settle(quotas.admit("a", 1, 8), 8)
    with pytest.raises(RateLimited):
        quotas.admit("a", 1, 8)
    quotas.replace([ApiKey(**entry("a", "sk-a", requests_per_minute=600))])
    quotas.settle(quotas.admit("a", 1, 8), 8)  # the new rate, with a full bucket


def test_a_broken_key_file_stops_the_start_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([{"id": "team", "sha256": "not-a-digest"}]))
    with pytest.raises(ValueError, match=r"keys\.yaml"):
        KeyFile(path, [], lambda keys: None).keys()
    path.write_text(yaml.safe_dump({"api_keys": [entry("team", "sk-team")]}))
    assert [k.id for k in load_keys(path)] == ["team"]
