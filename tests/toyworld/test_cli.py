"""Bad input to the toy world's command line: one line on stderr, non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli import assert_one_line_error, run_module


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("toyworld", *args)


def test_unknown_preset(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("bootstrap", "--preset", "huge", "--out", str(tmp_path)), "unknown preset", "huge")


def test_unwritable_output_dir() -> None:
    # /proc refuses new directories even to root, so this holds for any CI user.
    assert_one_line_error(run_cli("bootstrap", "--preset", "test", "--out", "/proc/bon-gateway-models"), "cannot write")


def test_output_path_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(run_cli("bootstrap", "--preset", "test", "--out", str(blocker / "models")), "cannot write")


def test_unknown_subcommand_and_bad_seed() -> None:
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")
    assert_one_line_error(run_cli("bootstrap", "--seed", "many"), "invalid int value")


def test_bad_seeds_and_a_loop_report_without_runs(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("evaluate-loop", "--seeds", "0"), "--seeds", "a positive count")
    assert_one_line_error(run_cli("evaluate-loop", "--seeds", "1,x"), "--seeds", "a count (3) or a list")
    assert_one_line_error(run_cli("evaluate-loop", "--seeds", "2,2"), "distinct seeds")
    assert_one_line_error(run_cli("loop-report", str(tmp_path), "--out", str(tmp_path / "r")), "no run.json")
