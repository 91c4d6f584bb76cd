"""What a job builds (a chain or a model) follows the job's fate."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.models import Chain, Export, Job, Model

SUBJECTS = {"build_chain": Chain, "materialize_model": Model, "export_model": Export}


def mark_subject(session: Session, job: Job, status: str) -> None:
    """The subject takes the job's final status unless it is ready; a model's waiting exports (a fits request's:
    queued behind a model that never was ready) take it with the model."""
    table = SUBJECTS.get(job.kind)
    subject = session.get(table, job.subject_id) if table else None
    if subject is not None and subject.status != "ready":
        subject.status = status
        if table is Model:
            session.flush()  # the model's row first, as exports.request_export locks it before it reads
            session.execute(update(Export).where(Export.model_id == subject.id, Export.status == "queued")
                            .values(status=status))


def subject_ready(session: Session, job: Job) -> bool:
    """Whether the chain or model this job builds is ready already: an earlier attempt did the work, then lost its
    worker before it recorded the job's end. Running it again would replace what is served (a chain's anchors, and
    with them every model made from them since)."""
    table = SUBJECTS.get(job.kind)
    subject = session.get(table, job.subject_id) if table else None
    return subject is not None and subject.status == "ready"
