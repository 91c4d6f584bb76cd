"""The worker's events when a job ends (its outcome written), sent with app.services.webhooks: `job.succeeded` /
`job.failed` for every job, and for a materialization also `model.ready` / `model.failed` by the model's own status
(a model published before a later stage failed is ready). Cancelled jobs send none."""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, Model
from app.services.jobs import job_out
from app.services.models import model_out
from app.services.webhooks import event, send
from app.settings import Settings

MODEL_EVENTS = ("ready", "failed")


def payloads(session: Session, job: Job) -> list[bytes]:
    """`{"event": "job.<status>", "job": {...}}`, then `{"event": "model.<status>", "model": {...}, "job": {...}}`
    for a materialization, both as GET /jobs/{id} and GET /models/{id} show them."""
    bodies = [event(f"job.{job.status}", job=job_out(job))]
    model = session.get(Model, job.subject_id) if job.kind == "materialize_model" else None
    if model is not None and model.status in MODEL_EVENTS:
        bodies.append(event(f"model.{model.status}", model=model_out(session, model), job=job_out(job)))
    return bodies


def notify(settings: Settings, session_factory: sessionmaker[Session], job_id: str) -> threading.Thread | None:
    """Send the job's events from a thread of their own (returned, started): the next job starts at once. None when
    no webhook is configured."""
    if not settings.webhook_url:
        return None
    with session_factory() as session:
        bodies = payloads(session, session.get(Job, job_id))
    return send(settings, bodies, {"job_id": job_id})
