"""Fixtures for the training-round tests: the test preset's tokenizer and a deployment with a filled log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.trainer.rounds import write_log


@pytest.fixture
def tokenizer(test_models: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_models / "policy")


@pytest.fixture
def deployment(tmp_path: Path, test_models: Path, tokenizer: Any) -> Path:
    """A config file whose log holds 24 pairs served by the base policy, and an empty registry."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    write_log(url, tokenizer, 24)
    (tmp_path / "registry").mkdir()
    config = {
        "store": {"url": url, "data_dir": str(tmp_path / "data")},
        "trainer": {
            "registry_dir": str(tmp_path / "registry"),
            "base_policy": str(test_models / "policy"),
            "min_pairs": 8,
            "adapter": {"lora_r": 4, "lora_alpha": 8, "bf16": False},  # fp32: exact comparisons
            "dpo": {"epochs": 1, "batch_size": 8},
            "evaluation": {"prompts": 4, "max_new_tokens": 12},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
