"""loadtest/locustfile.py run for real: locust headless against a gateway on the mock backend
(streaming and N up to 8, thumbs, bad requests), with no failure of any kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from loadtest.servers import mock_backend
from tests.gateway.fakes import FakeScorer, FakeStore
from tests.serving import serving

ROOT = Path(__file__).resolve().parents[2]
NAMES = {
    "chat N=1", "chat N=4", "chat N=8", "chat N=1 stream", "chat N=4 stream", "chat N=8 stream", "feedback",
    "bad request (400 expected)",
}  # fmt: skip


@pytest.fixture
def gateway_url(tmp_path: Path) -> Iterator[str]:
    with mock_backend(delay_ms=5) as backend:
        settings = GatewaySettings(
            backends=[{"url": backend, "model": "policy"}],  # type: ignore[list-item]
            store={"data_dir": tmp_path / "data"},  # type: ignore[arg-type]
            n_candidates=4,
            feedback={"per_minute": 1e6, "burst": 10_000},  # type: ignore[arg-type]  # one keyless user thumbs a lot
        )
        with serving(create_app(settings, scorer=FakeScorer({}), store=FakeStore())) as url:
            yield url


def test_the_locustfile_runs_clean_against_a_gateway(gateway_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "BON_WAIT_S": "0.02", "BON_STREAM_SHARE": "0.3", "BON_THUMB_SHARE": "0.5"}
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--host", gateway_url,
         "--headless", "-u", "6", "-r", "6", "-t", "8s", "--json", "--only-summary", "--stop-timeout", "5"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    stats = json.loads(run.stdout)
    by_name = {s["name"]: s for s in stats}
    total, failures = sum(s["num_requests"] for s in stats), sum(s["num_failures"] for s in stats)
    print(f"\nlocust, 6 users for 8 s: {total} requests, {failures} failures: " + ", ".join(
        f"{name} {s['num_requests']}" for name, s in sorted(by_name.items())))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert failures == 0, [(s["name"], s["num_failures"]) for s in stats if s["num_failures"]]
    assert set(by_name) == NAMES  # every part of the mix ran
    assert total >= 100
