"""Short-lived signed download links: a file's URL with `?expires=&signature=`, which works without a bearer
header, for a browser's download (the console) or a tool that cannot send one. The signature is HMAC-SHA256 over the
path and the expiry with the server's key (`CBD_SIGNING_SECRET`); the standard library's hmac is all it takes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import datetime, timezone

from app.errors import ApiError
from app.settings import Settings


def link_key(settings: Settings) -> bytes:
    """The configured key, or a random one for this process (its links then work on this process only)."""
    return settings.signing_secret.encode() if settings.signing_secret else secrets.token_bytes(32)


def signature(key: bytes, path: str, expires: int) -> str:
    return hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, path: str, expires: int) -> str:
    """`path` with its expiry (Unix seconds) and signature as query parameters."""
    return f"{path}?expires={expires}&signature={signature(key, path, expires)}"


def check(key: bytes, path: str, expires: int, given: str, now: float | None = None) -> None:
    """403 for a link altered, signed with another key, or past its expiry."""
    if not hmac.compare_digest(signature(key, path, expires), given):
        raise ApiError(403, "this download link is not valid (altered, or signed by another server); ask for a new "
                            "one: POST /models/{id}/signed-links")
    if expires < (time.time() if now is None else now):
        when = datetime.fromtimestamp(expires, timezone.utc).isoformat().replace("+00:00", "Z")
        raise ApiError(403, f"this download link expired at {when}; ask for a new one: "
                            "POST /models/{id}/signed-links")
