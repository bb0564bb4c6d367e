"""Property-based fuzzing of every endpoint from the gateway's own OpenAPI document (schemathesis), on fakes (and a
real SQLite log, which the inspector's reads query).

Valid and invalid bodies, parameters and headers, generated from ``/openapi.json`` (which describes the real bodies,
extensions included): no answer is a 5xx, and every error is OpenAI's error shape. Deterministic (fixed seed,
derandomized), so a failure here is reproducible, not luck. Prints the number of cases and their statuses.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.app import create_app
from tests.gateway.conftest import ANSWERS, REWARDS
from tests.gateway.conftest import settings as gateway_settings
from tests.gateway.fakes import FakeGenerator, FakeScorer

ADMIN = "fuzz-admin-token"
EXAMPLES = 150
"""Per operation and generation mode (valid, invalid): 11 operations x 2 x 150, over 1,000 cases in all."""
STATUSES: Counter[int] = Counter()

DATA = Path(tempfile.mkdtemp(prefix="fuzz-"))
app = create_app(
    gateway_settings(
        allow_keyless_public=True, admin_token=ADMIN, limits={"max_body_bytes": 65536},
        store={"url": f"sqlite:///{DATA / 'log.db'}", "data_dir": str(DATA)},  # a real log: the inspector's reads query it
        swap={"registry_dir": str(DATA / "registry")},
    ),
    generator=FakeGenerator(ANSWERS),
    scorer=FakeScorer(REWARDS),
)  # fmt: skip
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], deterministic=True
)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    total, errors = sum(STATUSES.values()), sum(n for status, n in STATUSES.items() if status >= 500 and status != 504)
    print(f"\nfuzzing: {total} generated cases, {errors} 5xx; statuses {dict(sorted(STATUSES.items()))}")
    assert total >= 1000, f"only {total} cases ran"


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_error_in_openai_shape(case: Any) -> None:
    response = case.call(headers={"authorization": f"Bearer {ADMIN}"})
    STATUSES[response.status_code] += 1
    if response.status_code == 504 and isinstance(case.body, dict) and "deadline_ms" in case.body:
        assert response.json()["error"]["code"] == "deadline_exceeded"  # what a client asking for 1 ms may get
        return
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400 and response.status_code != 499:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text[:500]
        assert isinstance(error["message"], str)
        assert error["message"]
