"""What a job builds (a chain or a model) follows the job's fate."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import Chain, Job, Model

SUBJECTS = {"build_chain": Chain, "materialize_model": Model}


def mark_subject(session: Session, job: Job, status: str) -> None:
    table = SUBJECTS.get(job.kind)
    subject = session.get(table, job.subject_id) if table else None
    if subject is not None and subject.status != "ready":
        subject.status = status
