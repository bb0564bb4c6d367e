"""Circuit breakers, one per model backend: stop sending requests to a backend that keeps
failing, and try it again after a cool-down.

Each backend URL is closed (used), open (skipped, after ``failures`` failures in a row, for
``cooldown_s``) or half-open (the cool-down is over: one request probes it; success closes
it, failure opens it again for another cool-down). A failure is what says the backend is
not answering: a connection refused or not made within the connect timeout, a request
timeout, a dropped connection, a 5xx other than overload. A 4xx or an overload 503 says it
is alive. Time is monotonic; state is in memory, per gateway process (each replica judges
for itself what it can reach). Sends nothing itself: ``gateway.generate`` asks which
backends it may try and reports each outcome.

Hand-written (about 50 lines) rather than ``pybreaker``: pybreaker wraps synchronous calls
(its asynchronous support is Tornado's), and ``aiobreaker``, its asyncio port, is no longer
maintained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class _Backend:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    def __init__(self, failures: int, cooldown_s: float, on_change: Callable[[str, State], None] = lambda url, s: None) -> None:
        self._failures = failures
        self._cooldown_s = cooldown_s
        self._on_change = on_change
        self._backends: dict[str, _Backend] = {}

    def state(self, url: str) -> State:
        b = self._backends.get(url)
        if b is None or b.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - b.opened_at >= self._cooldown_s else "open"

    def claim(self, url: str) -> bool:
        """Whether a request may be sent to ``url`` now; a half-open backend admits one probe at a time."""
        state = self.state(url)
        if state == "closed":
            return True
        b = self._backends[url]
        if state == "open" or b.probing:
            return False
        b.probing = True
        return True

    def retry_in(self, urls: list[str]) -> float:
        """Seconds until the first of ``urls`` may be probed."""
        now = time.monotonic()
        opened = [b.opened_at for u in urls if (b := self._backends.get(u)) is not None and b.opened_at is not None]
        return max(0.0, min((t + self._cooldown_s - now for t in opened), default=0.0))

    def succeeded(self, url: str) -> None:
        b = self._backends.pop(url, None)
        if b is not None and b.opened_at is not None:
            self._on_change(url, "closed")

    def failed(self, url: str) -> None:
        b = self._backends.setdefault(url, _Backend())
        b.failures += 1
        b.probing = False
        if b.opened_at is not None or b.failures >= self._failures:
            b.opened_at = time.monotonic()  # opened, or a failed probe: another cool-down
            self._on_change(url, "open")

    def forget(self, url: str) -> None:
        """``url`` is gone for good (a stopped blue-green instance): its state goes too."""
        self._backends.pop(url, None)

    def released(self, url: str) -> None:
        """A claimed request ended without saying anything about the backend (the client left, an overload 503)."""
        b = self._backends.get(url)
        if b is not None:
            b.probing = False
