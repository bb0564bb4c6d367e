"""API keys: ``Authorization: Bearer <key>`` checked against SHA-256 digests from config.

Knows how a bearer token maps to a key id (what later features use for ownership and
limits). With no keys configured the gateway is keyless and everyone is one owner,
``KEYLESS_ID``. Keys are compared by digest in constant time; clear keys are never stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from gateway.errors import AuthenticationFailed
from gateway.settings import ApiKey

KEYLESS_ID = "anonymous"


def digest(key: str) -> str:
    """What config stores for a key: ``python -c "import hashlib;print(hashlib.sha256(b'sk-...').hexdigest())"``."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = [(key.sha256, key.id) for key in keys]

    @property
    def keyless(self) -> bool:
        return not self._keys

    def identify(self, authorization: str | None) -> str:
        """The key id for an ``Authorization`` header value; raises ``AuthenticationFailed``."""
        if self.keyless:
            return KEYLESS_ID
        if not authorization:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("malformed Authorization header: expected 'Bearer <key>'")
        wanted = digest(token.strip())
        found = None
        for stored, key_id in self._keys:
            if hmac.compare_digest(stored, wanted):
                found = key_id
        if found is None:
            raise AuthenticationFailed("incorrect API key provided")
        return found
