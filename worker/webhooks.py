"""Signed webhooks when a job succeeds or fails: POST JSON to CBD_WEBHOOK_URL with an HMAC-SHA256 signature.

Receivers check `X-CBD-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>` and `X-CBD-Timestamp`.
Sent from a thread of their own, off the job lane, within a wall-clock deadline.
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
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job
from app.services.jobs import job_out
from app.settings import Settings

log = logging.getLogger("cbd.webhooks")
ATTEMPTS = 3
ATTEMPT_TIMEOUT = 10.0  # httpx's, per connect or read; the deadline bounds the whole delivery


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def payload(job: Job) -> bytes:
    return json.dumps({"event": f"job.{job.status}", "job": job_out(job).model_dump(mode="json")}).encode()


def notify(settings: Settings, session_factory: sessionmaker[Session], job_id: str) -> threading.Thread | None:
    """Send the job's webhook from a thread of its own (returned, started): a slow receiver never holds the job
    lane, the next job starts at once. None when no webhook is configured."""
    if not settings.webhook_url:
        return None
    with session_factory() as session:
        body = payload(session.get(Job, job_id))
    thread = threading.Thread(target=deliver, name=f"webhook-{job_id}", daemon=True,
                              args=(settings.webhook_url, settings.webhook_secret, body,
                                    settings.webhook_timeout_seconds, job_id))
    thread.start()
    return thread


def deliver(url: str, secret: str, body: bytes, deadline_seconds: float, job_id: str) -> bool:
    """POST with retries, all within `deadline_seconds` of wall-clock time: httpx's timeouts are per read, so a
    receiver sending a byte every few seconds would hold one request for ever."""
    try:
        return asyncio.run(asyncio.wait_for(_attempts(url, secret, body, job_id), deadline_seconds))
    except TimeoutError:
        log.warning("webhook not delivered within its %.0f s deadline", deadline_seconds, extra={"job_id": job_id})
        return False


async def _attempts(url: str, secret: str, body: bytes, job_id: str) -> bool:
    async with httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT) as client:
        for attempt in range(ATTEMPTS):
            timestamp = str(int(time.time()))  # signed afresh: receivers may refuse old timestamps (replays)
            headers = {"Content-Type": "application/json", "X-CBD-Timestamp": timestamp,
                       "X-CBD-Signature": sign(secret, timestamp, body)}
            try:
                (await client.post(url, content=body, headers=headers)).raise_for_status()
                return True
            except httpx.HTTPError as error:
                log.warning("webhook attempt %d failed: %s", attempt + 1, error, extra={"job_id": job_id})
                if attempt + 1 < ATTEMPTS:
                    await asyncio.sleep(2**attempt)
    return False
