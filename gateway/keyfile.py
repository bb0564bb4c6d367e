"""API keys from a file that may change while the gateway runs: adding, rotating and revoking
keys without a restart (a Kubernetes Secret mounted as a file is updated in place).

Knows the file's format (YAML: a list of ``api_keys`` entries, or a mapping with an
``api_keys`` list) and how to follow it: every ``keys_reload_s`` its modification time and
size are compared, and a changed file is read and validated whole; a file that does not
parse or validate leaves the keys as they were (logged). Does not authenticate: it hands the
keys to the ``KeyRing`` and the ``Quotas``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from gateway.settings import ApiKey

log = logging.getLogger("gateway.keys")
_KEYS = TypeAdapter(list[ApiKey])


def load_keys(path: Path) -> list[ApiKey]:
    """The keys in ``path``; raises ``ValueError`` naming the file when it cannot be read or is not valid."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"api_keys_file {path}: {exc.__class__.__name__}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("api_keys")
    try:
        return _KEYS.validate_python(data if data is not None else [])
    except ValidationError as exc:
        raise ValueError(f"api_keys_file {path}: {exc.error_count()} invalid entries: {exc.errors()[0]['msg']}") from None


class KeyFile:
    """Follows ``path``; ``apply`` gets the configured keys plus the file's each time the file changes."""

    def __init__(self, path: Path, configured: Sequence[ApiKey], apply: Callable[[list[ApiKey]], None]) -> None:
        self.path = path
        self._configured = list(configured)
        self._apply = apply
        self._seen: tuple[float, int] | None = None

    def keys(self) -> list[ApiKey]:
        """Read now (at start: an invalid file stops the gateway rather than starting it with the wrong keys)."""
        self._seen = self._stamp()
        return [*self._configured, *load_keys(self.path)]

    def check(self) -> bool:
        """Re-read the file if it changed; whether the keys were replaced."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            keys = [*self._configured, *load_keys(self.path)]
        except ValueError as exc:
            log.error("%s; the keys stay as they were", exc)
            return False
        self._apply(keys)
        log.info("api keys reloaded from %s: %d keys, %d revoked", self.path, len(keys), sum(k.revoked for k in keys))
        return True

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await asyncio.to_thread(self.check)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size
