"""Which policy versions are loaded on vLLM, and which of them may be taken off.

Knows each version's format (lora, full), when each stopped being routed, the rollback
target (the LoRA version routed before the current one, kept loaded while there is room),
this gateway's requests in flight per version, the drain after which no request can still
be using an unrouted version (``swap.drain_s`` passed, and none of this gateway's requests
still on it), and which versions hold an adapter slot (``swap.max_live_adapters`` bounds
them). Bookkeeping on a monotonic clock only: it loads and unloads nothing
(``gateway.placement``) and follows no pointer (``gateway.swap``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Slots:
    drain_s: float
    formats: dict[str, str] = field(default_factory=dict)
    """Version → its format, for every version prepared since start."""
    retired: dict[str, float] = field(default_factory=dict)
    """Version → when it stopped being routed (still loaded, draining)."""
    previous: str | None = None
    """The rollback target: the last LoRA version routed before the current one."""
    using: dict[str, int] = field(default_factory=dict)
    """Version → this gateway's requests in flight on it (a version is not drained while one still runs)."""

    def begin(self, version: str) -> None:
        """A request of this gateway starts on ``version``."""
        self.using[version] = self.using.get(version, 0) + 1

    def end(self, version: str) -> None:
        """That request is over (answered, failed, or its client left)."""
        left = self.using.get(version, 0) - 1
        if left > 0:
            self.using[version] = left
        else:
            self.using.pop(version, None)

    def prepared(self, version: str, kind: str) -> None:
        """``version`` (format ``kind``) is loaded and verified, about to be routed."""
        self.formats[version] = kind
        self.retired.pop(version, None)

    def routed(self, old: str | None, new: str) -> None:
        """``new`` is routed instead of ``old`` (None: the base model was routed)."""
        if old is not None and old != new:
            self.retired[old] = time.monotonic()
            if self.formats.get(old) == "lora":
                self.previous = old  # a full version is not kept: rolling back to it starts it again
        if new == self.previous:
            self.previous = None  # routed again (a rollback, or the fallback when a full instance died)
        self.retired.pop(new, None)

    def retire(self, version: str) -> None:
        """``version`` is no longer routed (a canary whose trial ended); it drains, then may be taken off."""
        self.retired[version] = time.monotonic()

    def forget(self, version: str) -> None:
        """``version`` is off vLLM (unloaded, or its instance stopped)."""
        self.retired.pop(version, None)

    def drained(self, version: str) -> bool:
        """Whether ``version`` is unrouted and requests that may use it are done (never true for a routed one): the
        drain period has passed (other replicas' requests) and none of this gateway's requests still runs on it."""
        return (
            version in self.retired and time.monotonic() - self.retired[version] >= self.drain_s and not self.using.get(version)
        )

    def unneeded(self) -> list[str]:
        """Drained versions other than the rollback target (it stays loaded while there is room)."""
        return [v for v in self.retired if v != self.previous and self.drained(v)]

    def live(self, serving: Iterable[str]) -> set[str]:
        """LoRA versions holding an adapter slot: those ``serving`` (routed, canary), the rollback target and those draining."""
        return {v for v in {*self.retired, *serving} if self.formats.get(v) == "lora"}
