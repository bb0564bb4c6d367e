"""Shared fixtures: the tiny models, built at most once per preset per test session.

Also enforces that no test is skipped: a missing dependency is an install step, so a
skip would hide a test that CI believes it ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import Postgres, remove, start_postgres

_skipped: list[str] = []


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``test`` preset's models (small, fast), shared by every module of the session.

    ``BON_TEST_MODELS=<dir>`` reuses a build kept there (local iteration; CI always builds)."""
    import os

    from toyworld.bootstrap import PRESETS, bootstrap

    kept = os.environ.get("BON_TEST_MODELS")
    out = Path(kept) if kept else tmp_path_factory.mktemp("models") / "test"
    if kept and (out / "policy" / "config.json").is_file() and (out / "reward_model" / "config.json").is_file():
        return out
    bootstrap(PRESETS["test"], out)
    return out


@pytest.fixture(scope="session")
def default_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``default`` preset built from scratch (its timings are in its report, not asserted)."""
    from toyworld.bootstrap import PRESETS, bootstrap

    out = tmp_path_factory.mktemp("models") / "default"
    bootstrap(PRESETS["default"], out)
    return out


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL server for the session (started on first use; see tests/postgres.py)."""
    server = start_postgres()
    yield server
    remove(server)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == pytest.ExitCode.OK:
        print(f"\nFAILED: {len(_skipped)} test(s) skipped; skips are not allowed: {', '.join(_skipped)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
