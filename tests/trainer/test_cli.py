"""Bad input to the trainer's command line: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess

from tests.cli import assert_one_line_error, run_module


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("trainer", *args)


def test_unknown_subcommand() -> None:
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")


def test_the_toy_worlds_commands_are_not_the_trainers() -> None:
    """The trainer does not know the toy world: its bootstrap and evaluate-loop are ``python -m toyworld``'s."""
    assert_one_line_error(run_cli("bootstrap"), "invalid choice", "bootstrap")
    assert_one_line_error(run_cli("evaluate-loop"), "invalid choice", "evaluate-loop")
