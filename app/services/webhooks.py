"""Signed webhooks: each event is POSTed as JSON to CBD_WEBHOOK_URL with an HMAC-SHA256 signature.

Receivers check `X-CBD-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>` and `X-CBD-Timestamp`.
Sent from a thread of their own, off the job lane and the request, within a wall-clock deadline. The events
(docs/SERVICE.md): `job.succeeded` / `job.failed` and `model.ready` / `model.failed` from the worker when a job
ends (worker/webhooks.py), `alias.created` / `alias.moved` / `alias.deleted` from the API (app/services/aliases.py).
Here, not in the worker, because the API sends events too and never imports the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time

import httpx
from pydantic import BaseModel

from app.settings import Settings

log = logging.getLogger("cbd.webhooks")
ATTEMPTS = 3
ATTEMPT_TIMEOUT = 10.0  # httpx's, per connect or read; the deadline bounds the whole delivery


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def event(name: str, **objects: BaseModel) -> bytes:
    """An event's body: `{"event": name, <key>: <the object as the API shows it>, ...}`."""
    shown = {key: value.model_dump(mode="json") for key, value in objects.items()}
    return json.dumps({"event": name, **shown}).encode()


def send(settings: Settings, bodies: list[bytes], extra: dict[str, str]) -> threading.Thread | None:
    """Send the events, in order, from a thread of their own (returned, started): a slow receiver never holds the
    job lane or the request. None when no webhook is configured. `extra`: the log fields of its warnings."""
    if not settings.webhook_url or not bodies:
        return None
    thread = threading.Thread(target=deliver, name="webhook", daemon=True,
                              args=(settings.webhook_url, settings.webhook_secret, bodies,
                                    settings.webhook_timeout_seconds, extra))
    thread.start()
    return thread


def deliver(url: str, secret: str, bodies: list[bytes], deadline_seconds: float, extra: dict[str, str]) -> bool:
    """POST each body with retries, all within `deadline_seconds` of wall-clock time: httpx's timeouts are per read,
    so a receiver sending a byte every few seconds would hold one request for ever. Whether all were delivered."""
    try:
        return asyncio.run(asyncio.wait_for(_send_all(url, secret, bodies, extra), deadline_seconds))
    except TimeoutError:
        log.warning("webhook not delivered within its %.0f s deadline", deadline_seconds, extra=extra)
        return False


async def _send_all(url: str, secret: str, bodies: list[bytes], extra: dict[str, str]) -> bool:
    async with httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT) as client:
        return all([await _attempts(client, url, secret, body, extra) for body in bodies])


async def _attempts(client: httpx.AsyncClient, url: str, secret: str, body: bytes, extra: dict[str, str]) -> bool:
    for attempt in range(ATTEMPTS):
        timestamp = str(int(time.time()))  # signed afresh: receivers may refuse old timestamps (replays)
        headers = {"Content-Type": "application/json", "X-CBD-Timestamp": timestamp,
                   "X-CBD-Signature": sign(secret, timestamp, body)}
        try:
            (await client.post(url, content=body, headers=headers)).raise_for_status()
            return True
        except httpx.HTTPError as error:
            log.warning("webhook attempt %d failed: %s", attempt + 1, error, extra=extra)
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(2**attempt)
    return False
