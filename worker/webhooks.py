"""Signed webhooks when a job succeeds or fails: POST JSON to CBD_WEBHOOK_URL with an HMAC-SHA256 signature.

Receivers check `X-CBD-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>` and `X-CBD-Timestamp`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from app.models import Job
from app.services.jobs import job_out
from app.settings import Settings

log = logging.getLogger("cbd.webhooks")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def payload(job: Job) -> bytes:
    return json.dumps({"event": f"job.{job.status}", "job": job_out(job).model_dump(mode="json")}).encode()


def notify(settings: Settings, session_factory: sessionmaker[Session], job_id: str) -> None:
    if not settings.webhook_url:
        return
    import httpx

    with session_factory() as session:
        body = payload(session.get(Job, job_id))
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-CBD-Timestamp": timestamp,
               "X-CBD-Signature": sign(settings.webhook_secret, timestamp, body)}
    for attempt in range(3):
        try:
            httpx.post(settings.webhook_url, content=body, headers=headers, timeout=10).raise_for_status()
            return
        except httpx.HTTPError as error:
            log.warning("webhook attempt %d failed: %s", attempt + 1, error, extra={"job_id": job_id})
            time.sleep(2**attempt)
