"""The circuit breaker's states, on a clock the test moves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway import breaker
from gateway.breaker import Breakers

URL = "http://vllm-a:8000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(breaker, "time", SimpleNamespace(monotonic=clock))
    return clock


def test_opens_after_failures_in_a_row_and_a_success_resets_the_count(clock: Clock) -> None:
    changes: list[tuple[str, str]] = []
    b = Breakers(failures=3, cooldown_s=10, on_change=lambda url, state: changes.append((url, state)))
    b.failed(URL)
    b.failed(URL)
    b.succeeded(URL)  # not in a row
    b.failed(URL)
    b.failed(URL)
    assert b.claim(URL)
    assert changes == []
    b.failed(URL)
    assert b.state(URL) == "open"
    assert not b.claim(URL)
    assert changes == [(URL, "open")]
    assert b.retry_in([URL, "http://other"]) == pytest.approx(10)


def test_after_the_cooldown_one_probe_at_a_time(clock: Clock) -> None:
    changes: list[str] = []
    b = Breakers(failures=1, cooldown_s=10, on_change=lambda url, state: changes.append(state))
    b.failed(URL)
    clock.now += 9.9
    assert not b.claim(URL)
    clock.now += 0.1
    assert b.state(URL) == "half_open"
    assert b.claim(URL)  # the probe
    assert not b.claim(URL)  # only one
    b.released(URL)  # the probe's client left: nothing learnt, another may probe
    assert b.claim(URL)
    b.failed(URL)  # a failed probe: another full cool-down
    assert b.state(URL) == "open"
    clock.now += 10
    assert b.claim(URL)
    b.succeeded(URL)
    assert b.state(URL) == "closed"
    assert b.claim(URL)
    assert b.claim(URL)
    assert changes == ["open", "open", "closed"]


def test_a_stopped_blue_green_instance_leaves_no_breaker_state_or_metric_series(clock: Clock) -> None:
    import asyncio

    from gateway.blue_green import Instances
    from gateway.metrics import Metrics

    b = Breakers(failures=1, cooldown_s=10)
    metrics = Metrics()
    b.failed(URL)
    metrics.backend_circuit.labels(URL).set(1)
    metrics.swap_probe_diff.labels(URL).set(1e-5)

    class Instance:
        url = URL

        def stop(self) -> None: ...

        def returncode(self) -> int | None:
            return None

    async def launch(model_dir: object, version: str) -> Instance:
        return Instance()

    def gone(url: str) -> None:
        b.forget(url)
        metrics.forget_backend(url)

    async def run() -> None:
        instances = Instances(launch, gone)  # type: ignore[arg-type]
        await instances.ensure("v0002", None)  # type: ignore[arg-type]
        await instances.stop("v0002")

    asyncio.run(run())
    assert b.state(URL) == "closed"
    assert URL not in metrics.exposition()[0].decode()
