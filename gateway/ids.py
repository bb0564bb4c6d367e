"""Completion ids that prove who owns them: ``chatcmpl-<nonce><mac>``.

The MAC is an HMAC-SHA256 of the nonce and the API key id under a server secret, so
``POST /v1/feedback`` can check that a completion exists and belongs to the caller
without the database: a thumb can arrive before the completion's record is written
(write-behind) or at another replica (same secret). A wrong owner and an unknown id look
the same (404: no existence leak). Does not know about keys or storage.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "chatcmpl-"
NONCE_HEX = 24
MAC_HEX = 24


class CompletionIds:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the completion-id secret must be at least 16 bytes")
        self._secret = secret

    def new(self, key_id: str) -> str:
        nonce = secrets.token_hex(NONCE_HEX // 2)
        return PREFIX + nonce + self._mac(nonce, key_id)

    def owned_by(self, completion_id: str, key_id: str) -> bool:
        body = completion_id.removeprefix(PREFIX)
        if not completion_id.startswith(PREFIX) or len(body) != NONCE_HEX + MAC_HEX:
            return False
        nonce, mac = body[:NONCE_HEX], body[NONCE_HEX:]
        return hmac.compare_digest(mac, self._mac(nonce, key_id))

    def _mac(self, nonce: str, key_id: str) -> str:
        return hmac.new(self._secret, f"{nonce}\x00{key_id}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def load_or_create_secret(path: Path) -> bytes:
    """The data dir's secret (created once, mode 0600): ids stay valid across restarts of one gateway, and one
    gateway's workers starting together agree on it (the first link wins; the others read it). Replicas behind one
    load balancer must share a configured secret instead."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic and exclusive: fails when another process created it first
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink()
    return secret
