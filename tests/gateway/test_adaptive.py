"""Adaptive N (``gateway.adaptive``): the best-of-n estimate against brute force, each rule on constructed evidence, and
the gateway choosing N per request on fakes (headers, metrics, a client's own N)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from gateway.adaptive import Latency, Spread, best_of, gains_of, kind_of, length_bucket
from tests.gateway.fakes import FakeGenerator, FakeScorer

CHAT = "/v1/chat/completions"


def test_best_of_n_is_the_mean_best_over_every_subset() -> None:
    rng = random.Random(0)
    rewards = [rng.gauss(0, 1) for _ in range(6)]
    for n in range(1, 7):
        subsets = list(itertools.combinations(rewards, n))
        assert best_of(rewards, n) == pytest.approx(sum(max(s) for s in subsets) / len(subsets))
    assert gains_of([1.0, 0.0, 0.0, 0.0]) == pytest.approx([0.0, 0.25, 0.5, 0.75])  # P(the good one is among n) - 1/4
    with pytest.raises(ValueError, match="best of 3 from 2"):
        best_of([1.0, 2.0], 3)


def _fed(spread: Spread, rewards: list[float], times: int, kind: str = "t/len<64") -> Spread:
    for k in range(times):
        spread.observe("v1", kind, rewards[k % len(rewards) :] + rewards[: k % len(rewards)])
    return spread


def test_the_smallest_n_that_keeps_the_gain() -> None:
    """One right answer in four: each extra candidate helps, so all four are kept. Three right in four: the second
    candidate already finds one, so two keep all the gain."""
    rare = _fed(Spread(min_requests=10, explore=0.0), [1.0, 0.0, 0.0, 0.0], 10)
    assert (rare.choose("v1", "t/len<64", 4, 1).n, rare.choose("v1", "t/len<64", 4, 1).reason) == (4, "spread")
    common = _fed(Spread(min_requests=10, explore=0.0), [1.0, 1.0, 1.0, 0.0], 10)
    choice = common.choose("v1", "t/len<64", 4, 1)
    assert (choice.n, choice.reason) == (2, "spread")
    assert choice.gain == pytest.approx(0.25)
    # less of the gain kept, fewer candidates: with 1 in 4, half the gain (0.375) needs n = 3 (0.5)
    half = _fed(Spread(min_requests=10, explore=0.0, keep_gain=0.5), [1.0, 0.0, 0.0, 0.0], 10)
    assert half.choose("v1", "t/len<64", 4, 1).n == 3
    assert common.choose("v1", "t/len<64", 4, 3).n == 3  # never below the answers asked for


def test_a_price_per_candidate_stops_n_where_the_next_one_buys_less() -> None:
    """Rewards 0, 1, 2, 3: best of 1..4 is 1.5, 2.33, 2.75, 3, so candidates 2, 3 and 4 add 0.83, 0.42 and 0.25. Keeping
    0.9 of the gain needs all four; a price of 0.3 stops at three, 0.5 at two. The same shape at a tenth of the scale
    (a policy whose candidates the reward model now tells less apart) keeps the share at four, and the price drops it to
    one."""
    rewards = [0.0, 1.0, 2.0, 3.0]
    share = _fed(Spread(min_requests=10, explore=0.0), rewards, 10).choose("v1", "t/len<64", 4, 1)
    assert (share.n, share.reason) == (4, "spread")
    for price, n in ((0.3, 3), (0.5, 2), (0.9, 1), (0.2, 4)):
        choice = _fed(Spread(min_requests=10, explore=0.0, price=price), rewards, 10).choose("v1", "t/len<64", 4, 1)
        assert (choice.n, choice.reason) == (n, "price" if n < 4 else "spread")
    distilled = _fed(Spread(min_requests=10, explore=0.0, price=0.3), [r / 10 for r in rewards], 10)
    assert distilled.choose("v1", "t/len<64", 4, 1).n == 1
    assert _fed(Spread(min_requests=10, explore=0.0, price=0.9), rewards, 10).choose("v1", "t/len<64", 4, 2).n == 2  # n=2 asked


def test_no_gain_shown_means_one_candidate_and_a_new_kind_or_version_starts_at_the_cap() -> None:
    equal = _fed(Spread(min_requests=20, explore=0.0), [0.5, 0.5, 0.5, 0.5], 20)
    assert (equal.choose("v1", "t/len<64", 4, 1).n, equal.choose("v1", "t/len<64", 4, 1).reason) == (1, "spread")
    assert (equal.choose("v2", "t/len<64", 4, 1).n, equal.choose("v2", "t/len<64", 4, 1).reason) == (4, "cold")
    assert equal.choose("v1", "other/len<64", 4, 1).reason == "cold"
    short = _fed(Spread(min_requests=20, explore=0.0), [0.5, 0.5, 0.5, 0.5], 19)
    assert short.choose("v1", "t/len<64", 4, 1).reason == "cold"
    # requests at a lower N do not show the cap's gain
    two = _fed(Spread(min_requests=5, explore=0.0), [1.0, 0.0], 50)
    assert two.choose("v1", "t/len<64", 4, 1).reason == "cold"


def test_every_tenth_request_explores_at_the_cap_and_the_window_and_kinds_are_bounded() -> None:
    spread = _fed(Spread(min_requests=10, explore=0.1), [0.5, 0.5, 0.5, 0.5], 10)
    reasons = [spread.choose("v1", "t/len<64", 4, 1).reason for _ in range(30)]
    assert reasons.count("explore") == 3
    assert {r for r in reasons if r != "explore"} == {"spread"}
    window = _fed(Spread(window=10, min_requests=10, explore=0.0), [1.0, 0.0, 0.0, 0.0], 10)
    _fed(window, [0.5, 0.5, 0.5, 0.5], 10)  # the older ten leave the window
    assert window.gain("v1", "t/len<64", 4) == pytest.approx((10, 0.0, 0.0))
    # requests at a lowered N do not push the cap's out: each n is read from its own last ten, and the kind stays warm
    lowered = _fed(Spread(window=10, min_requests=10, explore=0.0), [1.0, 0.0, 0.0, 0.0], 10)
    _fed(lowered, [0.5, 0.5], 50)
    assert lowered.gain("v1", "t/len<64", 4) == pytest.approx((10, 0.75, 0.0))
    assert lowered.gain("v1", "t/len<64", 2) == pytest.approx((10, 0.0, 0.0))
    assert lowered.choose("v1", "t/len<64", 4, 1).reason == "spread"
    few = Spread(max_kinds=3)
    for k in range(5):
        few.observe("v1", f"k{k}", [1.0, 0.0])
    assert few.gain("v1", "k0", 2)[0] == 0
    assert few.gain("v1", "k4", 2)[0] == 1


def test_latency_is_predicted_from_recent_requests_and_fits_the_budget() -> None:
    latency = Latency(horizon_s=30.0, quantile=0.95)
    assert latency.most_within(0.001, 8, 1, now=0.0) == 8  # nothing seen yet: the cap, learnt by serving
    for k in range(16):
        n = 1 + k % 8
        latency.observe(n, 0.1 + 0.05 * n, now=float(k))
    assert latency.predict(4, now=16.0) == pytest.approx(0.3)
    assert latency.most_within(0.32, 8, 1, now=16.0) == 4
    assert latency.most_within(10.0, 8, 1, now=16.0) == 8
    assert latency.most_within(0.01, 8, 2, now=16.0) == 2
    assert latency.predict(4, now=100.0) is None  # past the horizon: forgotten
    # under load the line is refit at most every refit_s, not on every request
    busy = Latency(refit_s=1.0)
    for _ in range(8):
        busy.observe(4, 0.4, now=0.0)
    assert busy.predict(4, now=0.0) == pytest.approx(0.4)  # the first fit as soon as there are enough observations
    busy.observe(4, 4.0, now=0.5)
    assert busy.predict(4, now=0.5) == pytest.approx(0.4)  # within refit_s: the same fit
    assert (busy.predict(4, now=1.0) or 0.0) > 0.4  # then refit with the slow one
    # one N seen: proportional to N; the slowest 5% set the scale
    one = Latency(quantile=0.95, refit_s=0.0)
    for k in range(20):
        one.observe(4, 0.8 if k < 2 else 0.4, now=0.0)  # 2 in 20 twice as slow: the 95th percentile
    assert one.predict(4, now=0.0) == pytest.approx(0.8)
    assert one.most_within(0.45, 4, 1, now=0.0) == 2


def test_kinds_are_a_task_and_a_length_bucket() -> None:
    assert [length_bucket(c, [64, 256]) for c in (0, 63, 64, 300)] == ["len<64", "len<64", "len<256", "len>=256"]
    assert kind_of("math", 10, [64]) == "math/len<64"
    assert kind_of(None, 100, [64]) == "-/len>=64"


def _adaptive(make_client: Callable[..., TestClient], scorer: FakeScorer, **adaptive: object) -> TestClient:
    config = {"enabled": True, "min_requests": 5, "explore": 0.0, **adaptive}
    return make_client(generator=FakeGenerator(["a", "b", "c", "d"]), scorer=scorer, adaptive=config)


def _ask(client: TestClient, task: str | None = None, **extra: object) -> tuple[int, str | None]:
    body = {"model": "toy-bon", "messages": [{"role": "user", "content": "Hi?"}], **extra}
    if task is not None:
        body["metadata"] = {"task": task}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return int(response.headers["x-bon-n"]), response.headers.get("x-bon-adaptive")


def test_the_gateway_lowers_n_where_extra_candidates_bought_little(make_client: Callable[..., TestClient]) -> None:
    """Rewards 0, 1, 2, 3 for the four candidates: best of 3 keeps 0.8 of best of 4's gain. All rewards equal: one."""
    client = _adaptive(make_client, FakeScorer({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}), keep_gain=0.8)
    assert [_ask(client, "math") for _ in range(5)] == [(4, "cold")] * 5
    assert _ask(client, "math") == (3, "spread")
    assert _ask(client, "chat") == (4, "cold")  # another task: its own evidence
    assert _ask(client, "math", n_candidates=4) == (4, None)  # the client's own N is kept
    assert _ask(client, "math", n=2) == (3, "spread")
    metrics = client.get("/metrics").text
    assert 'bon_adaptive_n_total{reason="cold"} 6.0' in metrics
    assert 'bon_adaptive_n_total{reason="spread"} 2.0' in metrics
    # the compute dividend's figures: N per request and what best-of-N bought (d, 3, over the first candidate a, 0)
    assert 'bon_version_requests_total{policy_version="base"} 9.0' in metrics
    assert 'bon_version_candidates_total{policy_version="base"} 34.0' in metrics  # 7 x 4 + 2 x 3
    assert 'bon_best_of_n_gain_sum{policy_version="base"} 25.0' in metrics  # 7 x 3 (d over a) + 2 x 2 (c over a)
    assert 'bon_best_of_n_gain_squares_total{policy_version="base"} 71.0' in metrics
    assert "bon_adaptive_gain_kept_count 2.0" in metrics
    priced = _adaptive(make_client, FakeScorer({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}), min_gain_per_candidate=0.3)
    for _ in range(5):
        _ask(priced, "math")
    assert _ask(priced, "math") == (3, "price")  # the fourth candidate adds 0.25 < 0.3
    assert 'bon_adaptive_n_total{reason="price"} 1.0' in priced.get("/metrics").text
    flat = _adaptive(make_client, FakeScorer({}))
    for _ in range(5):
        _ask(flat)
    assert _ask(flat) == (1, "spread")
    assert _ask(flat, stream=True) == (1, "spread")


def test_the_spread_rule_is_held_at_the_configured_n_while_a_canary_is_on_trial(
    make_client: Callable[..., TestClient],
) -> None:
    """A canary starts cold at the cap; were the current version still lowered, the gate would compare best-of-4 answers
    with best-of-1 ones. During a trial every arm gets the configured N (``trial``); after it, the spread rule again."""
    client = _adaptive(make_client, FakeScorer({}))
    service = client.app.state.gateway.service  # type: ignore[attr-defined]
    for _ in range(5):
        _ask(client, "math")
    assert _ask(client, "math") == (1, "spread")
    trial = [True]
    service.on_trial = lambda: trial[0]
    assert _ask(client, "math") == (4, "trial")
    assert _ask(client, "math", n_candidates=2) == (2, None)  # a client's own N is still its own
    assert 'bon_adaptive_n_total{reason="trial"} 1.0' in client.get("/metrics").text
    trial[0] = False
    assert _ask(client, "math") == (1, "spread")


def test_a_latency_budget_lowers_n_to_what_fits(make_client: Callable[..., TestClient]) -> None:
    client = make_client(generator=FakeGenerator(["a", "b"], delay_s=0.02))
    assert [_ask(client, latency_budget_ms=1) for _ in range(8)] == [(4, None)] * 8  # learning what N costs
    assert _ask(client, latency_budget_ms=1) == (1, "budget")
    assert _ask(client, latency_budget_ms=1, n=2) == (2, "budget")
    assert _ask(client, latency_budget_ms=60_000) == (4, None)
    assert _ask(client, latency_budget_ms=1, n_candidates=3) == (1, "budget")  # a client's N is the most, under a budget
    configured = make_client(generator=FakeGenerator(["a", "b"], delay_s=0.02), adaptive={"latency_budget_ms": 1})
    for _ in range(8):
        _ask(configured)
    assert _ask(configured) == (1, "budget")
    assert 'bon_adaptive_n_total{reason="budget"} 1.0' in configured.get("/metrics").text
    bad = client.post(CHAT, json={"model": "toy-bon", "messages": [{"role": "user", "content": "Hi"}], "latency_budget_ms": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "latency_budget_ms"
