"""The trainer's settings: the shared adapter section, and configs written before it existed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.settings import ConfigError
from trainer.settings import load

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_shipped_config_uses_the_adapter_section() -> None:
    settings = load(CONFIGS / "local.yaml").trainer  # filterwarnings=error: no deprecation warning either
    assert settings.adapter.lora_r == 16
    assert "lora_r" not in settings.dpo.model_dump()


def test_adapter_keys_under_dpo_are_still_read_with_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"dpo": {"beta": 0.2, "lora_r": 4, "seed": 7, "max_length": 128}}}))
    with pytest.warns(DeprecationWarning, match=r"trainer\.adapter"):
        settings = load(config).trainer
    assert (settings.adapter.lora_r, settings.adapter.seed, settings.adapter.max_length) == (4, 7, 128)
    assert settings.dpo.beta == 0.2


def test_an_adapter_key_set_in_both_places_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"dpo": {"lora_r": 4}, "adapter": {"lora_r": 8}}}))
    with pytest.raises(ConfigError, match=r"trainer\.adapter\.lora_r"):
        load(config)
