"""Adaptive N: how many candidates a request gets, from what extra samples bought lately and a latency budget.

Knows two rules and the evidence each reads (both per gateway process, in memory):
- **spread**: per policy version and prompt kind (the client's declared task, ``metadata.task``, and a length bucket
  of the messages), the rewards of recent requests (for each n, the last ``window`` that ran at n or more). Each
  request's candidates give the expected best of n for every n up to its N (the unbiased estimate from order
  statistics), so one request at the cap measures the gain of every n. A request gets the smallest n that keeps
  ``keep_gain`` of the gain at the cap, and one candidate when that gain is within noise (below ``z`` standard
  errors). With a ``price``, it gets no candidate whose expected gain over one fewer is below that price (``price``):
  a share of a gain that shrinks yet stays measurable keeps N where it was, a price does not. A kind with fewer than
  ``min_requests`` requests at the cap gets the cap (``cold``), and afterwards every ``1/explore``-th request still
  does (``explore``), so the gain at the cap stays measured and N grows again when it grows. Keyed by version, a new
  policy starts cold: as training distils best-of-N into the policy, its gain shrinks and so does N.
- **budget**: the latency of recent requests against their N, a least-squares line over the last ``horizon_s``,
  scaled by the ``quantile`` of how far requests landed above it; a request gets the most candidates whose predicted
  latency fits its budget (``latency_budget_ms``, per request or configured). Load shows in that latency: more
  requests in flight, or a longer vLLM queue, make every N slower, so N falls; with nothing observed yet it is the cap.
Never below the ``n`` answers asked for, never above the cap. Does not know HTTP or vLLM: the service feeds it each
request's rewards and latency and applies its choice.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Reason = Literal["cap", "cold", "explore", "spread", "price", "budget", "trial"]
"""Why a request got its N; ``trial`` (the service's): the spread rule held while a canary is on trial."""
MIN_LATENCY_OBSERVATIONS = 8
"""Requests seen within the horizon before the budget rule predicts; fewer: the cap, and learn by serving."""


def best_of(rewards: Sequence[float], n: int) -> float:
    """The expected best reward of ``n`` candidates drawn without replacement from these (all of them: their maximum;
    one: their mean): sum over the sorted rewards of P(the i-th smallest is the best of n) x reward."""
    k = len(rewards)
    if not 1 <= n <= k:
        raise ValueError(f"cannot take the best of {n} from {k} rewards")
    ordered = sorted(rewards)
    total = math.comb(k, n)
    return sum(math.comb(i, n - 1) * ordered[i] for i in range(n - 1, k)) / total


def gains_of(rewards: Sequence[float]) -> list[float]:
    """One request's gain of the best of n over one sample, for n = 1..len(rewards) (the first is 0)."""
    one = best_of(rewards, 1)
    return [best_of(rewards, n) - one for n in range(1, len(rewards) + 1)]


@dataclass
class Choice:
    n: int
    reason: Reason
    gain: float | None = None
    """The measured gain of the cap over one candidate (reward units), when the spread rule decided."""
    kept: float | None = None
    """The share of that gain the chosen N keeps (its own measured gain over the cap's; 0 when no gain was shown)."""


class _Kind:
    """One (version, kind)'s gains of n over one, for each n from the last ``window`` requests that ran at n or more,
    with running sums (so a choice costs O(cap)). Per n, so requests at a lowered N do not push the cap's out: the gain
    at the cap stays measured by its own last ``window`` requests, and a kind is cold once."""

    def __init__(self, window: int) -> None:
        self.recent: list[deque[float]] = []
        self.window = window
        self.count: list[int] = []
        self.sums: list[float] = []
        self.squares: list[float] = []
        self.seen = 0

    def add(self, g: list[float]) -> None:
        while len(self.count) < len(g):
            self.recent.append(deque())
            self.count.append(0)
            self.sums.append(0.0)
            self.squares.append(0.0)
        for i, x in enumerate(g):
            if len(self.recent[i]) == self.window:
                old = self.recent[i].popleft()
                self.count[i] -= 1
                self.sums[i] -= old
                self.squares[i] -= old * old
            self.recent[i].append(x)
            self.count[i] += 1
            self.sums[i] += x
            self.squares[i] += x * x

    def at(self, n: int) -> tuple[int, float, float]:
        """Requests with at least n candidates, their mean gain of n over one, and its standard error."""
        if n > len(self.count) or self.count[n - 1] == 0:
            return 0, 0.0, math.inf
        c, total = self.count[n - 1], self.sums[n - 1]
        mean = total / c
        if c < 2:
            return c, mean, math.inf
        variance = max(0.0, (self.squares[n - 1] - total * mean) / (c - 1))
        return c, mean, math.sqrt(variance / c)


@dataclass
class Spread:
    """Recent gains of best-of-n by (policy version, kind); the ``max_kinds`` most recently used kept."""

    window: int = 200
    min_requests: int = 30
    keep_gain: float = 0.9
    explore: float = 0.1
    z: float = 1.96
    price: float | None = None
    """The least a further candidate must add to the expected best reward (reward units) to be generated; None: no
    price, the ``keep_gain`` share alone."""
    max_kinds: int = 512
    _kinds: OrderedDict[tuple[str, str], _Kind] = field(default_factory=OrderedDict)

    def _kind(self, key: tuple[str, str]) -> _Kind:
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = _Kind(self.window)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        self._kinds.move_to_end(key)
        return kind

    def observe(self, version: str, kind: str, rewards: Sequence[float]) -> None:
        if len(rewards) > 1:
            self._kind((version, kind)).add(gains_of(rewards))

    def choose(self, version: str, kind: str, cap: int, floor: int) -> Choice:
        state = self._kind((version, kind))
        state.seen += 1
        if cap <= floor:
            return Choice(cap, "cap")
        count, top, error = state.at(cap)
        if count < self.min_requests:
            return Choice(cap, "cold")
        every = max(1, round(1 / self.explore)) if self.explore > 0 else 0
        if every and state.seen % every == 0:
            return Choice(cap, "explore")
        if top <= self.z * error:  # no gain shown: one candidate does as well
            return Choice(floor, "spread", top, state.at(floor)[1] / top if top > 0 else 1.0)
        n = max(floor, next(k for k in range(1, cap + 1) if state.at(k)[1] >= self.keep_gain * top))
        reason: Reason = "spread"
        if self.price is not None:  # the first n whose next candidate would buy less than its price
            priced = next((k for k in range(floor, n) if state.at(k + 1)[1] - state.at(k)[1] < self.price), n)
            n, reason = priced, "price" if priced < n else reason
        return Choice(n, reason, top, state.at(n)[1] / top)

    def gain(self, version: str, kind: str, n: int) -> tuple[int, float, float]:
        """Requests seen with at least ``n`` candidates, the mean gain of ``n`` over one, and its standard error."""
        state = self._kinds.get((version, kind))
        return state.at(n) if state is not None else (0, 0.0, math.inf)


@dataclass
class Latency:
    """Recent requests' latency against their N: ``predict(n)``, the ``quantile`` latency at N=n under the current
    load (None: fewer than ``MIN_LATENCY_OBSERVATIONS`` within ``horizon_s``). The fit is redone at most every
    ``refit_s`` (a request's choice stays O(1) under load)."""

    horizon_s: float = 30.0
    quantile: float = 0.95
    refit_s: float = 0.1
    _seen: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=1024))
    _fit: tuple[float, float, float] | None = None
    _fitted_at: float = -math.inf
    _observed: int = 0
    _fitted_observed: int = -1

    def observe(self, n: int, seconds: float, now: float | None = None) -> None:
        self._seen.append((time.monotonic() if now is None else now, n, seconds))
        self._observed += 1

    def fit(self, now: float | None = None) -> tuple[float, float, float] | None:
        """(fixed seconds, seconds per candidate, the quantile's scale over the line), or None. Redone when ``refit_s``
        has passed, or before there is a fit, on every new observation (so the first fit comes as soon as it can)."""
        now = time.monotonic() if now is None else now
        stale = now - self._fitted_at >= self.refit_s
        if not stale and not (self._fit is None and self._observed != self._fitted_observed):
            return self._fit
        self._fitted_at, self._fitted_observed = now, self._observed
        self._fit = _fit([(k, s) for at, k, s in self._seen if now - at <= self.horizon_s], self.quantile)
        return self._fit

    def predict(self, n: int, now: float | None = None) -> float | None:
        fitted = self.fit(now)
        if fitted is None:
            return None
        base, slope, scale = fitted
        return (base + slope * n) * scale

    def most_within(self, budget_s: float, cap: int, floor: int, now: float | None = None) -> int:
        """The most candidates (``floor``..``cap``) predicted to answer within ``budget_s``; nothing known: ``cap``."""
        fitted = self.fit(now)
        if fitted is None:
            return cap
        base, slope, scale = fitted
        if (base + slope * cap) * scale <= budget_s:
            return cap
        if slope <= 0:
            return floor
        return max(floor, min(cap, math.floor((budget_s / scale - base) / slope)))


def _fit(recent: list[tuple[int, float]], quantile: float) -> tuple[float, float, float] | None:
    if len(recent) < MIN_LATENCY_OBSERVATIONS:
        return None
    ns, ss = [float(k) for k, _ in recent], [s for _, s in recent]
    mean_n, mean_s = sum(ns) / len(ns), sum(ss) / len(ss)
    spread_n = sum((k - mean_n) ** 2 for k in ns)
    if spread_n > 0:  # a line through the observed Ns: a fixed part and a part per candidate
        slope = max(0.0, sum((k - mean_n) * (s - mean_s) for k, s in zip(ns, ss, strict=True)) / spread_n)
        base = max(0.0, mean_s - slope * mean_n)
    else:  # one N seen: latency taken as proportional to N (too high above it, so the budget errs on the safe side)
        slope, base = mean_s / mean_n, 0.0
    ratios = sorted(s / (base + slope * k) for k, s in zip(ns, ss, strict=True) if base + slope * k > 0)
    if not ratios:
        return None
    scale = ratios[min(len(ratios) - 1, max(0, math.ceil(quantile * len(ratios)) - 1))]
    return base, slope, max(1.0, scale)


def length_bucket(chars: int, edges: Sequence[int]) -> str:
    """``len<64``, ``len<256``, ..., ``len>=1024``: the bucket of a request's message characters."""
    i = bisect.bisect_right(edges, chars)
    return f"len<{edges[i]}" if i < len(edges) else f"len>={edges[-1]}" if edges else "len"


def kind_of(task: str | None, chars: int, edges: Sequence[int]) -> str:
    """A request's kind for the spread rule: its declared task (``-`` if none) and its length bucket."""
    return f"{task or '-'}/{length_bucket(chars, edges)}"
