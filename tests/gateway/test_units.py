"""Selection, keys and settings on their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import KEYLESS_ID, KeyRing, digest
from gateway.errors import AuthenticationFailed
from gateway.select import rank, select
from gateway.settings import ApiKey, Backend, ConfigError, GatewaySettings, load

BACKENDS = [Backend(url="http://127.0.0.1:8100", model="policy")]


def test_rank_is_by_reward_then_generation_order() -> None:
    assert rank([0.1, 2.0, 2.0, -1.0]) == [1, 2, 0, 3]
    assert select([0.1, 2.0, 2.0, -1.0], 2) == [1, 2]
    with pytest.raises(ValueError, match="cannot select"):
        select([1.0], 2)


def test_keys_are_checked_by_digest() -> None:
    ring = KeyRing([ApiKey(id="a", sha256=digest("sk-a")), ApiKey(id="b", sha256=digest("sk-b"))])
    assert ring.identify("Bearer sk-b", local=True) == "b"
    for header in (None, "", "Bearer ", "Token sk-a", "Bearer sk-c"):
        with pytest.raises(AuthenticationFailed):
            ring.identify(header, local=True)
    assert KeyRing([]).identify(None, local=True) == KEYLESS_ID


def test_keyless_gateway_refuses_a_public_address() -> None:
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        GatewaySettings(host="0.0.0.0", backends=BACKENDS)
    assert GatewaySettings(host="0.0.0.0", backends=BACKENDS, allow_keyless_public=True).host == "0.0.0.0"
    keyed = GatewaySettings(host="0.0.0.0", backends=BACKENDS, api_keys=[ApiKey(id="a", sha256=digest("k"))])
    assert keyed.api_keys[0].id == "a"


def test_yaml_with_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("port: 8001\nbackends:\n  - {url: 'http://127.0.0.1:8100', model: policy}\nscorer: {threads: 1}\n")
    monkeypatch.setenv("GATEWAY_PORT", "9001")
    monkeypatch.setenv("GATEWAY_SCORER__THREADS", "2")
    settings = load(config)
    assert settings.port == 9001
    assert settings.scorer.threads == 2


def test_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("n_candidates: 40\nbackends: []\n")
    with pytest.raises(ConfigError, match="invalid config"):
        load(config)
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.yaml")


def test_the_shipped_configs_load() -> None:
    root = Path(__file__).parents[2] / "configs"
    for name in ("local.yaml", "gpu.yaml"):
        settings = load(root / name)
        assert settings.all_backends(), name
