"""Scoped bearer tokens (stored as sha256), per-token rate limits. Dependencies: `require("read")` etc."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Token
from app.services import links
from app.settings import Settings

SCOPES = ("read", "build", "admin")
TOKEN_PREFIX = "cbd_"
bearer = HTTPBearer(auto_error=False, description="A token from `cbd token create`")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    name: str  # the token id (or "anonymous" with auth off): owner of jobs, key of rate limits
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> list[str]:
    scopes = sorted({s.strip() for s in text.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}, got {text!r}")
    return scopes


def configured_tokens(settings: Settings) -> dict[str, frozenset[str]]:
    """CBD_TOKEN_HASHES: 'sha256hex:read,build;sha256hex:admin'."""
    result = {}
    for entry in filter(None, (e.strip() for e in settings.token_hashes.split(";"))):
        digest, _, scopes = entry.partition(":")
        result[digest.lower()] = frozenset(parse_scopes(scopes))
    return result


class RateLimiter:
    """A sliding one-minute window per key. In process memory; or, given a Redis URL (the service's broker, when it
    runs several API processes or machines), in Redis, so that the limit holds across all of them. Redis being
    unreachable lets requests through (logged): the limit is a guard, not a reason to refuse service."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, redis_url: str = ""):
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._redis_window = None
        if redis_url and per_minute > 0:
            import redis.asyncio

            self._redis_window = redis.asyncio.from_url(redis_url).register_script(SLIDING_WINDOW_LUA)

    async def check(self, key: str) -> float | None:
        """None when allowed, else the seconds to wait."""
        if self.per_minute <= 0:
            return None
        if self._redis_window is None:
            return self._check_in_memory(key)
        from redis.exceptions import RedisError

        try:
            wait = await self._redis_window(keys=[f"cbd:rate:{key}"],
                                            args=[time.time(), self.WINDOW, self.per_minute, secrets.token_hex(8)])
        except RedisError:
            log.warning("rate limit not checked: Redis unreachable", exc_info=True)
            return None
        return None if wait is None else float(wait)

    def _check_in_memory(self, key: str) -> float | None:
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.WINDOW:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return self.WINDOW - (now - hits[0])
            hits.append(now)
        return None


# One atomic step of the sliding window in a sorted set of hit times: drop hits older than the window; if the window
# is full, return the seconds until its oldest hit leaves it; else record this hit (a unique member) and return nil.
SLIDING_WINDOW_LUA = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(window - (now - tonumber(oldest[2])))
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window))
return false
"""


class TokenCache:
    """Database tokens by hash, remembered briefly so that a request costs no token query (and no thread hop): a
    revoked token is refused by each API process within `seconds` (CBD_TOKEN_CACHE_SECONDS)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[float, Principal | None]] = {}

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(digest)
        if entry is None or time.monotonic() - entry[0] >= self.seconds:
            return False, None
        return True, entry[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), principal)


def lookup_token(request: Request, digest: str) -> Principal | None:
    with request.app.state.session_factory() as session:
        token = session.scalar(select(Token).where(Token.hash == digest))
    return Principal(token.id, frozenset(token.scopes)) if token else None


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return Principal("anonymous", frozenset(SCOPES))
    challenge = {"WWW-Authenticate": 'Bearer realm="cbd"'}
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", headers=challenge)
    digest = hash_token(credentials.credentials)
    scopes = request.app.state.configured_tokens.get(digest)
    if scopes is not None:
        return Principal(f"cfg_{digest[:12]}", scopes)
    cache: TokenCache = request.app.state.token_cache
    known, principal = cache.get(digest)
    if not known:
        principal = await run_in_threadpool(lookup_token, request, digest)
        cache.put(digest, principal)
    if principal is None:
        raise ApiError(401, "invalid bearer token", headers=challenge)
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        principal = await authenticate(request, credentials)
        if not principal.has(scope):
            raise ApiError(403, f"this token lacks the {scope!r} scope (it has {', '.join(sorted(principal.scopes))})")
        await rate_limit(request, principal)
        return principal

    return dependency


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


async def rate_limit(request: Request, principal: Principal) -> None:
    key = principal.name if principal.name != "anonymous" else f"ip:{client_address(request)}"
    wait = await request.app.state.rate_limiter.check(key)
    if wait is not None:
        raise ApiError(429, f"rate limit of {request.app.state.settings.rate_limit_per_minute} requests per "
                            "minute exceeded", headers={"Retry-After": str(max(1, round(wait)))})


async def reader_or_link(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    expires: Annotated[int | None, Query(ge=0, le=2**40, description="a signed link's expiry (Unix seconds)")] = None,
    signature: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="a signed link's signature")] = None,
) -> Principal:
    """Downloads: a `read` token, or a signed link (`?expires=&signature=` from POST /models/{id}/signed-links),
    checked whether auth is on or off."""
    if expires is None and signature is None:
        return await require("read")(request, credentials)
    if expires is None or signature is None:
        raise ApiError(403, "a signed link carries both expires and signature")
    links.check(request.app.state.link_key, request.url.path, expires, signature)
    principal = Principal(f"link:{client_address(request)}", frozenset({"read"}))
    await rate_limit(request, principal)
    return principal


def create_token(session: Session, scopes: list[str], name: str = "") -> tuple[str, Token]:
    token = new_token()
    row = Token(name=name, hash=hash_token(token), scopes=scopes)
    session.add(row)
    session.commit()
    return token, row


def list_tokens(session: Session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.created_at, Token.id)))


def revoke_token(session: Session, token_id: str) -> bool:
    """Delete the token (its hash is all that was kept); whether there was one of that id."""
    revoked = session.execute(delete(Token).where(Token.id == token_id)).rowcount > 0
    session.commit()
    return revoked
