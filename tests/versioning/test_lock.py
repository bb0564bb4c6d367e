"""Two rounds never overlap: the file lock, and PostgreSQL's advisory lock on a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import Postgres
from versioning.lock import LockHeld, round_lock


def test_file_lock_excludes_a_second_round_and_is_released(tmp_path: Path) -> None:
    with round_lock(tmp_path), pytest.raises(LockHeld, match="another training round"), round_lock(tmp_path):
        pass
    with round_lock(tmp_path):  # released
        pass


def test_file_lock_dies_with_its_process(tmp_path: Path) -> None:
    code = (
        "import os\nfrom pathlib import Path\nfrom versioning.lock import round_lock\n"
        f"with round_lock(Path({str(tmp_path)!r})):\n    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 9  # killed mid-round
    with round_lock(tmp_path):
        pass


def test_advisory_lock_on_postgresql(tmp_path: Path, postgres: Postgres) -> None:
    # another machine: a different registry path, the same database
    with round_lock(tmp_path, postgres.url), pytest.raises(LockHeld, match="database"), round_lock(tmp_path / "b", postgres.url):
        pass
    with round_lock(tmp_path, postgres.url):
        pass
