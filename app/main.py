"""The app factory: `create_app(settings)`; `uvicorn --factory app.main:create_app` reads CBD_ settings."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

import cbd_engine
from app.auth import RateLimiter, TokenCache, configured_tokens
from app.db import make_engine, make_session_factory
from app.errors import install_error_handlers, problem, problem_openapi
from app.routers import aliases, chains, console, exports, files, hub, jobs, models, operations
from app.services.files import collect_blobs
from app.services.jobs import requeue_expired
from app.services.links import link_key
from app.services.operations import JobsCollector
from app.settings import Settings
from app.storage import open_store

log = logging.getLogger("cbd.api")


class BodyLimit:
    """Refuse request bodies over the configured size with a 413 problem, declared or streamed; and NUL bytes in
    the path (404) or query (422)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if "\x00" in scope["path"]:  # no name or id holds a NUL; PostgreSQL could not even compare one
            return await problem(404, "not found")(scope, receive, send)
        if b"%00" in scope.get("query_string", b""):
            return await problem(422, "query parameters may not contain NUL")(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            return await self._refuse(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # later receives (a client disconnecting during a download) are the server's own
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None past the limit. Read before the app runs: FastAPI turns a failing read of a
        streamed (chunked) body into a 400, and the limit is small enough to hold."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem(413, f"request body exceeds {self.max_bytes} bytes")(scope, receive, send)


class HostCheck:
    """Serve only the configured Host names (Settings.served_hosts), with a 400 problem otherwise. Not Starlette's
    TrustedHostMiddleware: it answers in plain text and takes '[::1]:8000' for the host '['."""

    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.served(Headers(scope=scope).get("host", "")):
            return await self.app(scope, receive, send)
        await problem(400, "this server does not answer to that Host header (CBD_TRUSTED_HOSTS)")(scope, receive,
                                                                                                  send)

    def served(self, header: str) -> bool:
        try:
            host = urlsplit(f"//{header}").hostname or ""
        except ValueError:  # a malformed port or bracket
            return False
        return any(pattern in ("*", host) or (pattern.startswith("*.") and host.endswith(pattern[1:]))
                   for pattern in self.hosts)


def _sweep_once(app: FastAPI) -> None:
    """With a broker: re-send jobs whose worker stopped renewing its lease."""
    with app.state.session_factory() as session:
        requeue_expired(session, app.state.settings)


def _collect_once(app: FastAPI) -> None:
    """Every blob of the store through the collector: those a delete spared because a publish had just touched
    them, and those a failed publish left."""
    store = app.state.store
    with app.state.session_factory() as session:
        collect_blobs(session, store, list(store.blob_ids()), app.state.settings.blob_grace_seconds)


async def _every(app: FastAPI, stop: asyncio.Event, seconds: float, work: Callable[[FastAPI], None]) -> None:
    """`work` every `seconds`, in a thread with its own database session, until `stop` is set. A run under way is
    finished, never cancelled: a cancelled await does not stop its thread, which would then use the database after
    the engine is disposed and leave a transaction (and its locks) open."""
    while not await _wait(stop, seconds):
        try:
            await asyncio.to_thread(work, app)
        except Exception:  # noqa: BLE001 - a periodic task must survive a database hiccup
            log.exception("%s failed", work.__name__)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:  # on Python 3.10 not the builtin TimeoutError
        return False
    return True


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    stop = asyncio.Event()
    # the collector every grace period (a minute at least: a grace of 0, for tests, must not spin)
    collect_every = max(settings.blob_grace_seconds, 60.0)
    periodic = [asyncio.create_task(_every(app, stop, collect_every, _collect_once))]
    if not settings.embedded:
        periodic.append(asyncio.create_task(_every(app, stop, settings.lease_seconds / 2, _sweep_once)))
    # what the process holds once started (modules, the app, its routes) lives as long as it does: out of every later
    # collection, whose full passes would otherwise scan it all (the console's chain page of 1,000 models: 95th
    # percentile 92 -> 20 ms, bench/console.py)
    gc.collect()
    gc.freeze()
    if not settings.auth_enabled:
        log.warning("authentication is OFF (CBD_AUTH=%s on %s): every request has every scope", settings.auth,
                    settings.host)
    yield
    gc.unfreeze()  # collectable again once this app stops (a test process starts many)
    stop.set()
    await asyncio.gather(*periodic)
    app.state.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="CBD model factory", version=cbd_engine.__version__, lifespan=lifespan, redirect_slashes=False,
                  description="Knowledge chains and teacher-free materialization of any-size SLMs. See API.md.")
    app.state.settings = settings
    app.state.engine = make_engine(settings.resolved_database_url)
    app.state.session_factory = make_session_factory(app.state.engine)
    app.state.store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_redis_url)
    app.state.token_cache = TokenCache(settings.token_cache_seconds)
    app.state.configured_tokens = configured_tokens(settings)
    app.state.link_key = link_key(settings)
    app.state.registry = CollectorRegistry()
    app.state.registry.register(JobsCollector(app.state.session_factory, settings))
    install_error_handlers(app)
    for module in (chains, models, aliases, exports, jobs, files, hub, operations, console):
        app.include_router(module.router)
    app.mount("/ui/static", console.static, name="console-static")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheck, hosts=settings.served_hosts)
    if settings.trusted_proxies:  # the client address (rate limits with auth off) from X-Forwarded-For
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = problem_openapi(get_openapi(title=app.title, version=app.version,
                                                             description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
    return app
