"""``python -m gateway serve`` with a model directory that is not there: a one-line error naming the fix.

The gateway never builds models (it does not import the toy world): ``make models`` does.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.cli import assert_one_line_error, run_module


def test_a_missing_model_is_a_one_line_error_that_names_the_build(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "managed_vllm": {"enabled": True, "model_dir": str(tmp_path / "models" / "policy")},
        "scorer": {"model_dir": str(tmp_path / "models" / "reward_model")},
        "store": {"data_dir": str(tmp_path / "data")},
    }))  # fmt: skip
    result = run_module("gateway", "serve", "--config", str(config))
    assert_one_line_error(result, "reward_model is missing", "make models", "python -m toyworld bootstrap")
    assert not (tmp_path / "models").exists()  # nothing was built
