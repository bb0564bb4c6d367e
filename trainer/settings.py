"""The trainer's one settings class: the same YAML as the gateway, with ``TRAINER_*`` overrides.

The trainer reads the gateway's config file (one file describes one deployment): the
``store`` section says where the log is, and the ``trainer`` section holds the trainer's
own knobs. Every other gateway key is ignored here. ``TRAINER_STORE__URL=...`` or
``TRAINER_TRAINER__PAIRS__MIN_MARGIN=0.5`` override the file (``__`` nests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from gateway.settings import ConfigError, StoreSettings, YamlSettings, read_yaml


class PairSettings(BaseModel):
    """How logged candidates become preference pairs (see ``trainer.pairs``)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["best_vs_worst", "best_vs_each"] = "best_vs_worst"
    min_margin: float = Field(default=0.0, ge=0.0, description="smallest reward gap kept as a pair (ties never are)")
    thumbs_override: bool = True
    """A thumb decides the pair whatever the reward model said (and waives ``min_margin``)."""


class TrainerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: PairSettings = Field(default_factory=PairSettings)
    registry_dir: Path = Path("registry")
    """Versioned models and the current/canary pointers (``trainer.registry``); shared with the gateways."""


class TrainerSettings(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", env_nested_delimiter="__", extra="ignore")

    store: StoreSettings = Field(default_factory=StoreSettings)
    trainer: TrainerSection = Field(default_factory=TrainerSection)


def load(path: Path | None) -> TrainerSettings:
    """Settings from the deployment's YAML file (optional), with the environment on top."""
    data = read_yaml(path)
    try:
        return TrainerSettings(**data)
    except ValueError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
