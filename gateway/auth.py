"""API keys and the admin token: ``Authorization: Bearer <key>`` checked in constant time.

Knows how a bearer token maps to a key id (what later features use for ownership and
limits). With no keys configured the gateway is keyless and everyone is one owner,
``KEYLESS_ID``, but only for a local caller (``local_caller``: a loopback peer that did not
come through a proxy), unless ``allow_keyless_public`` says everyone may. Keys are compared
by digest in constant time; clear keys are never stored. The admin endpoints take a
separate token (``admin_token``): without one they answer only local callers of a gateway
listening on a loopback address; a client API key gets 403 there, anything else 401. The
caller is judged by the connection, not by the address the gateway listens on: a proxy on
the same host would otherwise open both to everyone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from pydantic import SecretStr

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.settings import ApiKey, Scope, is_loopback

KEYLESS_ID = "anonymous"
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "via")
"""Set by proxies (nginx with its usual ``proxy_set_header``, Envoy, ingress controllers) on what they forward: such
a request is not a local caller's. A same-host proxy or tunnel that adds none of them (a bare ``proxy_pass``, an SSH
port forward) makes everyone it forwards local: give such a deployment API keys and an admin token."""


def local_caller(peer: str | None, headers: Mapping[str, str]) -> bool:
    """Whether a request comes straight from this host: a loopback peer address and no proxy header."""
    return peer is not None and is_loopback(peer) and not any(h in headers for h in PROXY_HEADERS)


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
    def __init__(self, keys: Sequence[ApiKey], *, keyless_public: bool = False) -> None:
        self._keys = [(key.sha256, key) for key in keys]
        self._keyless_public = keyless_public

    def replace(self, keys: Sequence[ApiKey]) -> None:
        """The keys from now on (``gateway.keyfile``: the file changed); one assignment, so a request sees old or new."""
        self._keys = [(key.sha256, key) for key in keys]

    @property
    def keyless(self) -> bool:
        return not self._keys

    def identify(self, authorization: str | None, local: bool, scope: Scope = "chat") -> str:
        """The key id for an ``Authorization`` header value (``local``: the caller is on this host, ``local_caller``);
        raises ``AuthenticationFailed``, or ``PermissionDenied`` when the key lacks ``scope``."""
        if self.keyless:
            if local or self._keyless_public:
                return KEYLESS_ID
            raise AuthenticationFailed(
                "this gateway has no API keys and serves only its own host (a loopback client, not through a proxy); "
                "configure api_keys, or allow_keyless_public"
            )
        found = self._find(authorization)
        if found is None:
            raise AuthenticationFailed("incorrect API key provided")
        if found.revoked:
            raise AuthenticationFailed("this API key has been revoked", code="revoked_api_key")
        if scope not in found.scopes:
            raise PermissionDenied(f"this API key has no '{scope}' scope (it has: {', '.join(found.scopes) or 'none'})")
        return found.id

    def _find(self, authorization: str | None) -> ApiKey | None:
        wanted = digest(bearer(authorization, "API key", "key"))
        found = None
        for stored, key in self._keys:  # every digest compared, in constant time each
            if hmac.compare_digest(stored, wanted):
                found = key
        return found

    def is_admin(self, authorization: str | None) -> bool:
        """Whether the header carries a key with the ``admin`` scope."""
        if self.keyless or not authorization:
            return False
        try:
            key = self._find(authorization)
        except AuthenticationFailed:
            return False
        return key is not None and not key.revoked and "admin" in key.scopes


class AdminGuard:
    def __init__(self, token: SecretStr | None, host: str, keys: KeyRing) -> None:
        self._digest = digest(token.get_secret_value()) if token is not None else None
        self._host = host
        self._keys = keys

    def check(self, authorization: str | None, local: bool) -> None:
        """Raises ``AuthenticationFailed`` (401) or ``PermissionDenied`` (403) unless the caller may administer
        (``local``: the caller is on this host, ``local_caller``). An API key with the ``admin`` scope is as good as
        the admin token."""
        if self._keys.is_admin(authorization):
            return
        if self._digest is None:
            if is_loopback(self._host) and local:
                return
            where = f"this gateway listens on {self._host}" if local else "the caller is not on this gateway's host"
            raise PermissionDenied(f"the admin endpoints need the admin_token here: {where} and no admin_token is set")
        if hmac.compare_digest(self._digest, digest(bearer(authorization, "admin token", "admin_token"))):
            return
        if not self._keys.keyless:
            try:
                self._keys.identify(authorization, local=False)
            except (AuthenticationFailed, PermissionDenied):
                pass
            else:
                raise PermissionDenied("this API key has no 'admin' scope; send the admin token or an admin key")
        raise AuthenticationFailed("incorrect admin token")
