"""The reward-hacking watch's state on the registry volume: whether it fires, why, and who cleared it.

One JSON file, ``<registry>/policy/watch.json``, written whole through a rename (a reader
never sees half of it). The trainer writes it when its watch fires (``trainer.watch``:
the statistics) and a round reads it to pause; the gateways read it for their metric and
``GET /admin/policy``, and an admin clears it (``POST /admin/watch/clear`` or
``python -m trainer watch clear``). A refit that restores the reward model's agreement
with thumbs clears it too. A cleared watch does not fire again on the same version: only
new evidence, about a newer version, does. Knows nothing about the statistics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE = "watch.json"


@dataclass
class WatchState:
    firing: bool = False
    version: str | None = None
    """The policy version the evidence is about (the current one when it fired)."""
    parent: str | None = None
    """The version it was compared with."""
    since: float | None = None
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    """Every check of the last evaluation: name, fired, estimate and interval, detail."""
    cleared_for: str | None = None
    """A clear holds for this version: the watch fires again only about another one."""
    cleared_by: str | None = None
    cleared_reason: str | None = None
    cleared_at: float | None = None
    checked_at: float | None = None


def path(registry_dir: Path) -> Path:
    return Path(registry_dir) / "policy" / FILE


def read(registry_dir: Path) -> WatchState:
    """The state (a quiet one before the first write, or when the file does not parse)."""
    try:
        data = json.loads(path(registry_dir).read_text())
        known = {k: v for k, v in data.items() if k in WatchState.__dataclass_fields__}
        return WatchState(**known)
    except (OSError, ValueError, TypeError):
        return WatchState()


def write(registry_dir: Path, state: WatchState) -> None:
    target = path(registry_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, target)


def clear(registry_dir: Path, by: str, reason: str) -> WatchState:
    """Clear a firing watch (a no-op record when it is quiet); the clear holds for the version it was about."""
    state = read(registry_dir)
    state.cleared_for = state.version if state.firing else state.cleared_for
    state.firing = False
    state.cleared_by, state.cleared_reason, state.cleared_at = by, reason, time.time()
    write(registry_dir, state)
    return state
