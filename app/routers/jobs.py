from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import Builder, Limit, PageToken, Reader, SessionDep
from app.errors import problem_responses
from app.schemas import JobKind, JobOut, JobStatus, Page
from app.services import jobs

router = APIRouter(tags=["jobs"], responses=problem_responses(400, 401, 403, 429))


@router.get("/jobs", response_model=Page[JobOut], responses=problem_responses(422))
def list_jobs(session: SessionDep, principal: Reader, limit: Limit = 50, page_token: PageToken = None,
              status: JobStatus | None = None, kind: JobKind | None = None) -> Page[JobOut]:
    return jobs.list_jobs(session, limit, page_token, status, kind)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=problem_responses(404))
def get_job(job_id: str, session: SessionDep, principal: Reader) -> JobOut:
    return jobs.job_out(jobs.get_job(session, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, responses=problem_responses(404, 409))
def cancel_job(job_id: str, session: SessionDep, principal: Builder, response: Response) -> JobOut:
    job = jobs.cancel_job(session, job_id, principal.name, principal.has("admin"))
    response.headers["Location"] = f"/jobs/{job.id}"
    return jobs.job_out(job)
