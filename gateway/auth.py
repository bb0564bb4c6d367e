"""API keys and the admin token: ``Authorization: Bearer <key>`` checked in constant time.

Knows how a bearer token maps to a key id (what later features use for ownership and
limits). With no keys configured the gateway is keyless and everyone is one owner,
``KEYLESS_ID``. Keys are compared by digest in constant time; clear keys are never stored.
The admin endpoints take a separate token (``admin_token``): without one they answer only
when the gateway listens on a loopback address; a client API key gets 403 there, anything
else 401.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.settings import ApiKey, is_loopback

KEYLESS_ID = "anonymous"


def digest(key: str) -> str:
    """What config stores for a key: ``python -c "import hashlib;print(hashlib.sha256(b'sk-...').hexdigest())"``."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(authorization: str | None, what: str, placeholder: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; raises ``AuthenticationFailed`` naming ``what``."""
    if not authorization:
        raise AuthenticationFailed(f"missing {what}: send 'Authorization: Bearer <{placeholder}>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(f"malformed Authorization header: expected 'Bearer <{placeholder}>'")
    return token.strip()


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
        wanted = digest(bearer(authorization, "API key", "key"))
        found = None
        for stored, key_id in self._keys:
            if hmac.compare_digest(stored, wanted):
                found = key_id
        if found is None:
            raise AuthenticationFailed("incorrect API key provided")
        return found


class AdminGuard:
    def __init__(self, token: SecretStr | None, host: str, keys: KeyRing) -> None:
        self._digest = digest(token.get_secret_value()) if token is not None else None
        self._host = host
        self._keys = keys

    def check(self, authorization: str | None) -> None:
        """Raises ``AuthenticationFailed`` (401) or ``PermissionDenied`` (403) unless the caller may administer."""
        if self._digest is None:
            if is_loopback(self._host):
                return
            raise PermissionDenied(
                f"the admin endpoints are disabled: this gateway listens on {self._host} and has no admin_token"
            )
        if hmac.compare_digest(self._digest, digest(bearer(authorization, "admin token", "admin_token"))):
            return
        if not self._keys.keyless:
            try:
                self._keys.identify(authorization)
            except AuthenticationFailed:
                pass
            else:
                raise PermissionDenied("this API key may not use the admin endpoints; send the admin token")
        raise AuthenticationFailed("incorrect admin token")
