"""Which policy version answers a request: the immutable ``Route`` and the canary's sticky share.

Knows that a request keeps the route it started with (a swap never fails a request in
flight) and how a canary's share is drawn: a hash of the version and the request's sticky
key (its ``user``, else its API key), the same on every replica and for the whole trial.
The request path needs only this; following the registry's pointers is ``gateway.swap``'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    """Which policy version new requests get, and the model name to ask each routable backend for."""

    version: str
    models: dict[str, str] = field(default_factory=dict)
    """Backend URL → model name (the base's served name, or an adapter name); absent: not routed to."""


def in_canary(key: str, version: str, fraction: float) -> bool:
    """Whether the sticky ``key`` falls in the ``fraction`` of keys the canary ``version`` answers (the same on
    every replica and for the whole trial; another version's trial draws another share)."""
    digest = hashlib.sha256(f"{version}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64
