"""What a job builds (a chain or a model) follows the job's fate."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import Chain, Export, Job, Model

SUBJECTS = {"build_chain": Chain, "materialize_model": Model, "export_model": Export}


def mark_subject(session: Session, job: Job, status: str) -> None:
    table = SUBJECTS.get(job.kind)
    subject = session.get(table, job.subject_id) if table else None
    if subject is not None and subject.status != "ready":
        subject.status = status


def subject_ready(session: Session, job: Job) -> bool:
    """Whether the chain or model this job builds is ready already: an earlier attempt did the work, then lost its
    worker before it recorded the job's end. Running it again would replace what is served (a chain's anchors, and
    with them every model made from them since)."""
    table = SUBJECTS.get(job.kind)
    subject = session.get(table, job.subject_id) if table else None
    return subject is not None and subject.status == "ready"
