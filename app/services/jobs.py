"""Jobs: creation, dispatch to the worker queues, listing, cancellation, and the lease sweeper."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.errors import ApiError, not_found
from app.models import Job, utcnow
from app.schemas import JobOut, JobRef, Page, Progress
from app.services.pagination import paginate, where_given
from app.services.subjects import mark_subject
from app.settings import Settings

log = logging.getLogger("cbd.jobs")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def queue_for(device: str, settings: Settings) -> str:
    return settings.auto_queue if device == "auto" else device


def job_ref(job: Job | None) -> JobRef | None:
    return JobRef(id=job.id, url=f"/jobs/{job.id}") if job else None


def job_out(job: Job) -> JobOut:
    subject = {"build_chain": "chain", "export_model": "export"}.get(job.kind, "model")
    result = {subject: job.subject_id, "warnings": job.warnings or []}
    known = set(Progress.model_fields)
    return JobOut(
        id=job.id, kind=job.kind, status=job.status, queue=job.queue,
        progress=Progress(**{k: v for k, v in (job.progress or {}).items() if k in known}),
        error=job.error, result=result, attempts=job.attempts, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


def check_capacity(session: Session, settings: Settings, owner: str) -> None:
    """The per-token cap on queued and running jobs (429)."""
    if settings.max_concurrent_jobs <= 0:
        return
    active = session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(ACTIVE)))
    if active >= settings.max_concurrent_jobs:
        raise ApiError(429, f"this token already has {active} queued or running jobs (the cap is "
                            f"{settings.max_concurrent_jobs}); retry when one finishes", headers={"Retry-After": "30"})


def check_budget(settings: Settings, estimate: float, what: str) -> None:
    if estimate > settings.job_budget_seconds:
        raise ApiError(422, f"{what} is estimated at {estimate:.0f} s, more than this server's job budget of "
                            f"{settings.job_budget_seconds:.0f} s")


def new_job(kind: str, subject_id: str, queue: str, owner: str, payload: dict[str, Any] | None = None,
            estimate: float | None = None) -> Job:
    progress = {"stage": "queued", "step": 0, "total": 0, "fraction": 0.0, "estimated_seconds": estimate}
    return Job(kind=kind, subject_id=subject_id, queue=queue, owner=owner, payload=payload or {}, progress=progress,
               status="queued")


def dispatch(session: Session, settings: Settings, job: Job) -> None:
    """Send a committed job to its queue (the embedded worker polls the table instead). A broker that is down is
    logged, not the caller's error: the job stays undispatched and the sweeper sends it later."""
    if settings.embedded:
        return
    from app.broker import send_job  # Celery loads only where a broker is used

    try:
        send_job(settings, job.kind, job.id, job.queue)
    except Exception:  # noqa: BLE001 - kombu raises many kinds; any of them means "not sent"
        log.exception("job %s: broker unreachable; the sweeper will send it", job.id, extra={"job_id": job.id})
        return
    session.execute(update(Job).where(Job.id == job.id).values(dispatched_at=utcnow()))
    session.commit()


def latest_job(session: Session, subject_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.subject_id == subject_id).order_by(Job.id.desc()).limit(1))


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(session: Session, limit: int, page_token: str | None, status: str | None, kind: str | None) -> Page:
    query = where_given(select(Job), (Job.status, status), (Job.kind, kind))
    rows, token = paginate(session, query, Job.id, limit, page_token)
    return Page[JobOut](items=[job_out(j) for j in rows], next_page_token=token)


def cancel_job(session: Session, job_id: str, owner: str, is_admin: bool) -> Job:
    """Queued: cancelled now. Running: flagged; the worker stops at its next step and keeps nothing half-written."""
    job = get_job(session, job_id)
    if job.owner != owner and not is_admin:
        raise ApiError(403, "cancelling another token's job needs the 'admin' scope")
    if job.status in FINISHED:
        raise ApiError(409, f"job {job.id} already finished ({job.status})")
    session.execute(update(Job).where(Job.id == job.id, Job.status.in_(ACTIVE)).values(cancel_requested=True))
    session.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                    .values(status="cancelled", finished_at=utcnow()))
    session.commit()
    session.refresh(job)
    if job.status == "cancelled":
        mark_subject(session, job, "cancelled")
        session.commit()
    return job


def requeue_expired(session: Session, settings: Settings) -> list[str]:
    """Jobs whose worker stopped renewing its lease go back to their queue (a claim keeps them single-run), and
    queued jobs that never reached the broker are sent."""
    now = utcnow()
    expired = list(session.scalars(select(Job).where(or_(
        and_(Job.status == "running", or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)),
        and_(Job.status == "queued", Job.dispatched_at.is_(None))))))
    for job in expired:
        log.warning("job %s (%s): sending it again", job.id, job.status, extra={"job_id": job.id})
        dispatch(session, settings, job)
    return [job.id for job in expired]
