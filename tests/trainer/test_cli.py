"""Bad input to the trainer's command line: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli import assert_one_line_error, run_module


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("trainer", *args)


def test_unknown_subcommand() -> None:
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")


def test_the_toy_worlds_commands_are_not_the_trainers() -> None:
    """The trainer does not know the toy world: its bootstrap and evaluate-loop are ``python -m toyworld``'s."""
    assert_one_line_error(run_cli("bootstrap"), "invalid choice", "bootstrap")
    assert_one_line_error(run_cli("evaluate-loop"), "invalid choice", "evaluate-loop")


def test_registry_init_lays_out_what_vllm_s_resolver_needs_before_any_round(tmp_path: Path) -> None:
    done = run_cli("registry", "init", "--registry", str(tmp_path / "registry"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "registry" / "policy" / "versions").is_dir()  # VLLM_LORA_RESOLVER_CACHE_DIR: vLLM needs it to start
    assert (tmp_path / "registry" / "reward_model" / "versions").is_dir()


def test_a_round_on_cpus_it_may_not_use_is_refused_before_it_starts(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"trainer:\n  registry_dir: {tmp_path / 'registry'}\n  cpus: [4096]\n")
    assert_one_line_error(run_cli("run", "--config", str(config)), "trainer.cpus names CPU 4096")
