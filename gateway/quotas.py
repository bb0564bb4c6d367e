"""Per-key quotas: requests and tokens per minute, requests at once, and the largest N and
``max_tokens`` a key may ask for (each optional, per key in ``api_keys``).

Requests and tokens are token buckets refilled continuously. A chat request takes one
request and reserves ``n_candidates`` × ``max_tokens`` completion tokens when it is admitted;
when it is over, the tokens it did not generate go back. A refusal is a 429 with
``Retry-After`` and OpenAI's headers (``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests``, the same three for
``-tokens``), which every answer to a key with quotas carries too.

Several replicas: each enforces its share, ``1/quota_replicas`` of every rate and of the
requests at once (at least 1), so that together they allow what the config says when a load
balancer spreads a key's requests evenly. No shared counter: one in PostgreSQL would put a
database round trip on every request, and the log's database is allowed to be down. In
process, event loop only (no locks needed). Hand-written rather than ``limits`` or
``aiolimiter``: neither reserves an amount and gives part of it back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.errors import InvalidRequest, RateLimited
from gateway.settings import ApiKey


@dataclass
class _Bucket:
    capacity: float
    per_s: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_s)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is there (0: now)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.per_s

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.per_s


@dataclass
class Ticket:
    """One admitted request's hold on its key's quotas."""

    key_id: str
    reserved: int


class Quotas:
    def __init__(self, keys: Sequence[ApiKey], replicas: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = {k.id: k for k in keys}
        self._share = 1 / replicas
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}

    def replace(self, keys: Sequence[ApiKey]) -> None:
        """The keys' limits from now on (``gateway.keyfile``); a key whose rates changed starts a full bucket at them."""
        changed = {k.id for k in keys if (old := self._keys.get(k.id)) is None or old.model_dump() != k.model_dump()}
        for buckets in (self._requests, self._tokens):
            for key_id in changed & buckets.keys():
                del buckets[key_id]
        self._keys = {k.id: k for k in keys}

    def admit(self, key_id: str, n_candidates: int, max_tokens: int) -> Ticket:
        """Hold the key's quotas for one request, or raise (400 over a per-request limit, 429 over a rate)."""
        key = self._keys.get(key_id)
        if key is None:
            return Ticket(key_id, 0)
        if key.max_n_candidates is not None and n_candidates > key.max_n_candidates:
            raise InvalidRequest(f"this API key may ask for at most {key.max_n_candidates} candidates", param="n_candidates")
        if key.max_tokens is not None and max_tokens > key.max_tokens:
            raise InvalidRequest(f"this API key may ask for at most {key.max_tokens} max_tokens", param="max_tokens")
        now = self._clock()
        requests = self._bucket(self._requests, key_id, key.requests_per_minute, now)
        tokens = self._bucket(self._tokens, key_id, key.tokens_per_minute, now)
        reserve = n_candidates * max_tokens
        if tokens is not None and reserve > tokens.capacity:
            raise InvalidRequest(
                f"n_candidates x max_tokens = {reserve} exceeds this API key's {tokens.capacity:.0f} tokens per minute"
                " (on this replica)", param="max_tokens",
            )  # fmt: skip
        limit = max(1, math.floor(key.max_concurrent * self._share)) if key.max_concurrent is not None else None
        if limit is not None and self._running.get(key_id, 0) >= limit:
            raise self._refused(key_id, f"this API key already has {limit} requests running", 1.0)
        if requests is not None and (wait := requests.wait_for(1)):
            raise self._refused(key_id, "this API key's requests per minute are used up", wait)
        if tokens is not None and (wait := tokens.wait_for(reserve)):
            raise self._refused(key_id, "this API key's tokens per minute are used up", wait)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= reserve
        self._running[key_id] = self._running.get(key_id, 0) + 1
        return Ticket(key_id, reserve if tokens is not None else 0)

    def settle(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The request is over: it no longer runs, and the reserved tokens it did not use go back."""
        if ticket.key_id not in self._keys:
            return
        self._running[ticket.key_id] -= 1
        tokens = self._tokens.get(ticket.key_id)
        if tokens is not None and used_tokens is not None:
            tokens.refill(self._clock())
            tokens.level = min(tokens.capacity, tokens.level + max(0, ticket.reserved - used_tokens))

    def headers(self, key_id: str) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the key's rates (none for a key without them)."""
        out: dict[str, str] = {}
        now = self._clock()
        for name, buckets in (("requests", self._requests), ("tokens", self._tokens)):
            bucket = buckets.get(key_id)
            if bucket is None:
                continue
            bucket.refill(now)
            out[f"x-ratelimit-limit-{name}"] = str(round(bucket.capacity))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = f"{bucket.reset_s():.3f}s"
        return out

    def _bucket(self, buckets: dict[str, _Bucket], key_id: str, per_minute: float | None, now: float) -> _Bucket | None:
        if per_minute is None:
            return None
        bucket = buckets.get(key_id)
        if bucket is None:
            rate = per_minute * self._share
            capacity = max(1.0, rate)  # a replica's share below one request a minute still admits one now and then
            bucket = buckets[key_id] = _Bucket(capacity, rate / 60.0, capacity, now)
        bucket.refill(now)
        return bucket

    def _refused(self, key_id: str, why: str, wait_s: float) -> RateLimited:
        error = RateLimited(f"{why}; retry in {math.ceil(wait_s)} s", wait_s)
        error.headers.update(self.headers(key_id))
        return error
