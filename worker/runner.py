"""Running one job under a lease: claim it in the jobs table, renew the lease with heartbeats, report progress,
stop cooperatively on cancellation, and write the outcome only while the lease is still ours.

A job whose worker died (its lease expired) is claimed again by another worker; a live lease is never taken over,
so a job never runs twice at once, whatever the broker redelivers. A job whose workers died `max_attempts` times
(a crash loop: out of memory, a segfault) fails instead of running again.

Two time limits: at the soft one the job stops at the engine's next `should_stop` check; at the hard one (work that
no longer reaches a check) the heartbeat thread marks the job failed and ends the worker process, whose supervisor
(`cbd serve`, Celery's pool) starts a fresh one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, utcnow
from app.services.jobs import dispatch
from app.services.subjects import mark_subject, subject_ready
from app.settings import Settings
from cbd_engine.spec.progress import Cancelled, ProgressEvent
from worker.webhooks import notify

log = logging.getLogger("cbd.worker")


SHUTDOWN = threading.Event()  # set when the worker process is asked to stop: running jobs go back to the queue
EXIT_HARD_TIME_LIMIT = 70  # the worker process's exit status after a job hit its hard time limit


class LeaseLost(Exception):
    """Another worker holds this job now; this one stops and writes nothing."""


class TimeLimitExceeded(Exception):
    pass


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _expired(now: object) -> object:
    return and_(Job.status == "running", or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))


def _claimable(now: object) -> object:
    return or_(Job.status == "queued", _expired(now))


def fail_exhausted(session: Session, job_id: str, max_attempts: int) -> bool:
    """Fail the job instead of running it again when its lease expired after `max_attempts` runs, each of which
    lost its worker; True when this call failed it."""
    if max_attempts <= 0:
        return False
    error = (f"WorkerLost: the worker running this job stopped without finishing it {max_attempts} times (killed, "
             "out of memory or crashed); it is not run again")
    return _end(session, job_id, "failed", error, _expired(utcnow()), Job.attempts >= max_attempts)


def _end(session: Session, job_id: str, status: str, error: str | None, *conditions: object) -> bool:
    """Give the job its final status (and its chain or model too, unless it succeeded) in one UPDATE, if
    `conditions` still hold; whether they did."""
    job = session.get(Job, job_id)
    if job is None:
        return False
    # the database judges `conditions`, not Python on the loaded row (SQLite's naive datetimes and aware ones do
    # not compare): no session synchronization
    result = session.execute(
        update(Job).where(Job.id == job_id, *conditions)
        .values(status=status, error=error, finished_at=utcnow(), lease_expires_at=None,
                progress={**(job.progress or {}), "stage": status})
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    if status != "succeeded":
        mark_subject(session, job, status)
    session.commit()
    return True


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Take the job if it is queued or its lease expired: one UPDATE, so two workers never both win."""
    now = utcnow()
    session.execute(update(Job).where(Job.id == job_id, Job.cancel_requested.is_(True), _claimable(now))
                    .values(status="cancelled", finished_at=now, worker_id=None))
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.cancel_requested.is_(False), _claimable(now))
        .values(status="running", worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1, started_at=now)
    )
    session.commit()
    return result.rowcount == 1


def claimable_jobs(session: Session, limit: int = 20, kinds: tuple[str, ...] | None = None) -> list[str]:
    query = select(Job.id).where(_claimable(utcnow()))
    if kinds is not None:
        query = query.where(Job.kind.in_(kinds))
    return list(session.scalars(query.order_by(Job.id).limit(limit)))


@dataclass
class JobContext:
    """What a task sees of its job: ids, payload, progress reporting, the stop check and guarded commits."""

    job_id: str
    kind: str
    queue: str
    subject_id: str
    payload: dict
    settings: Settings
    session_factory: sessionmaker[Session]
    worker_id: str
    deadline: float
    hard_deadline: float = math.inf
    cancelled: bool = False
    lost: bool = False
    _last_progress: float = 0.0
    _estimate: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def renew(self, session: Session) -> None:
        """Extend our lease inside the caller's transaction, or raise LeaseLost."""
        result = session.execute(
            update(Job).where(Job.id == self.job_id, Job.worker_id == self.worker_id, Job.status == "running")
            .values(lease_expires_at=utcnow() + timedelta(seconds=self.settings.lease_seconds))
        )
        if result.rowcount != 1:
            self.lost = True
            raise LeaseLost(f"job {self.job_id}: lease lost")

    def commit(self, session: Session) -> None:
        """Commit the caller's writes only if the job is still ours (the lease row is locked with them)."""
        self.renew(session)
        session.commit()

    def heartbeat(self) -> None:
        with self.session_factory() as session:
            try:
                self.renew(session)
                self.cancelled = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
                session.commit()
            except LeaseLost:
                session.rollback()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.settings.heartbeat_seconds,
                                      max(0.0, self.hard_deadline - time.monotonic()))):
            if time.monotonic() >= self.hard_deadline:
                self._end_at_hard_limit()
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease has slack for several
                log.exception("heartbeat failed", extra={"job_id": self.job_id})

    def _end_at_hard_limit(self) -> None:
        """The work did not stop at the soft limit (it reaches no `should_stop` check): fail the job and end this
        process, the only way to stop a thread that does not listen."""
        limit = self.settings.hard_time_limit_seconds
        log.error("job exceeded its hard time limit of %.0f s; ending the worker process", limit,
                  extra={"job_id": self.job_id})
        if _finish(self, "failed", f"TimeLimitExceeded: job exceeded its hard time limit of {limit:.0f} s "
                                   "(its worker process was ended)"):
            webhook = notify(self.settings, self.session_factory, self.job_id)
            if webhook is not None:  # the process ends here: give the delivery its deadline first
                webhook.join(self.settings.webhook_timeout_seconds)
        logging.shutdown()
        os._exit(EXIT_HARD_TIME_LIMIT)

    def start(self) -> None:
        threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def handing_back(self) -> bool:
        """This worker is shutting down: a job it stops goes back to the queue (unless the user cancelled it)."""
        return SHUTDOWN.is_set() and not self.cancelled

    def runs_again_after(self, error: BaseException) -> bool:
        """Whether the job, stopped by `error`, will run again (handed back, or its lease taken by another worker):
        work it could resume from (checkpoints) must then be kept."""
        return isinstance(error, LeaseLost) or (isinstance(error, Cancelled) and (self.lost or self.handing_back))

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            limit = self.settings.soft_time_limit_seconds
            raise TimeLimitExceeded(f"job exceeded its soft time limit of {limit:.0f} s")
        return self.cancelled or self.lost or SHUTDOWN.is_set()

    def progress(self, event: ProgressEvent, force: bool = False) -> None:
        """The engine's callback: stored in the job, at most once a second (and always with `force`)."""
        now = time.monotonic()
        if not force and now - self._last_progress < 1.0 and event.step < event.total:
            return
        self._last_progress = now
        data = {**event.to_dict(), "estimated_seconds": self._estimate}
        with self.session_factory() as session:
            session.execute(update(Job).where(Job.id == self.job_id, Job.worker_id == self.worker_id)
                            .values(progress=data))
            session.commit()


Handler = Callable[[JobContext], None]


def _finish(ctx: JobContext, status: str, error: str | None = None) -> bool:
    """The job's outcome, written only while this worker still holds it."""
    with ctx.session_factory() as session:
        return _end(session, ctx.job_id, status, error, Job.worker_id == ctx.worker_id, Job.status == "running")


def _release(ctx: JobContext) -> None:
    """Give a job back to the queue at once (the worker is shutting down), rather than waiting out its lease. The
    run handed back does not count as an attempt: `max_attempts` caps runs whose worker was lost. With a broker, the
    job is sent again at once (its message is acknowledged when the task returns); if the broker cannot be reached,
    the job stays undispatched and the API's sweeper sends it."""
    with ctx.session_factory() as session:
        released = session.execute(
            update(Job).where(Job.id == ctx.job_id, Job.worker_id == ctx.worker_id, Job.status == "running")
            .values(status="queued", worker_id=None, lease_expires_at=None, started_at=None, dispatched_at=None,
                    attempts=Job.attempts - 1)
        ).rowcount == 1
        session.commit()
        if released:
            dispatch(session, ctx.settings, session.get(Job, ctx.job_id))


def run_job(job_id: str, settings: Settings, session_factory: sessionmaker[Session], handlers: dict[str, Handler],
            worker_id: str) -> str:
    """Claim and run one job; returns its final status, or 'skipped' when it is not ours to run."""
    with session_factory() as session:
        if fail_exhausted(session, job_id, settings.max_attempts):
            log.error("job failed: its workers were lost %d times", settings.max_attempts, extra={"job_id": job_id})
            notify(settings, session_factory, job_id)
            return "failed"
        if not claim(session, job_id, worker_id, settings.lease_seconds):
            return "skipped"
        job = session.get(Job, job_id)
        done = subject_ready(session, job)
        started = time.monotonic()
        ctx = JobContext(job.id, job.kind, job.queue, job.subject_id, dict(job.payload or {}), settings,
                         session_factory, worker_id, started + settings.soft_time_limit_seconds,
                         started + settings.hard_time_limit_seconds,
                         _estimate=(job.progress or {}).get("estimated_seconds"))
    extra = {"job_id": job_id, "job_kind": ctx.kind, "worker_id": worker_id}
    log.info("job started (attempt %d)", job.attempts, extra=extra)
    ctx.progress(ProgressEvent("starting", 0, 0), force=True)
    ctx.start()
    status, error = "succeeded", None
    try:
        if done:
            log.warning("job's subject %s is ready already; nothing to run again", ctx.subject_id, extra=extra)
        else:
            handlers[ctx.kind](ctx)
    except LeaseLost:
        log.warning("job lost its lease; another worker has it", extra=extra)
        return "lost"
    except Cancelled:
        if ctx.handing_back:
            ctx.stop()
            _release(ctx)
            log.info("job released: this worker is shutting down", extra=extra)
            return "released"
        status = "cancelled"
    except Exception as exc:  # noqa: BLE001 - any failure of the work is the job's failure, reported to the user
        if ctx.cancelled:
            status = "cancelled"
        else:
            status, error = "failed", f"{exc.__class__.__name__}: {exc}"
            log.exception("job failed", extra=extra)
    finally:
        ctx.stop()
    if not _finish(ctx, status, error):
        log.warning("job finished but its lease was taken; result discarded", extra=extra)
        return "lost"
    log.info("job %s", status, extra=extra)
    if status in ("succeeded", "failed"):
        notify(settings, session_factory, job_id)
    return status
