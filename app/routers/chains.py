from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.deps import (
    Admin,
    Builder,
    IdempotencyKeyHeader,
    Limit,
    PageToken,
    Reader,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from app.errors import problem_responses
from app.schemas import ChainAccepted, ChainCreate, ChainOut, Page, ResourceStatus
from app.services import chains, idempotency, jobs

router = APIRouter(tags=["chains"], responses=problem_responses(400, 401, 403, 429))


@router.post("/chains", status_code=202, response_model=ChainAccepted, responses=problem_responses(409, 413, 422))
def create_chain(body: ChainCreate, session: SessionDep, settings: SettingsDep, principal: Builder,
                 response: Response, idempotency_key: IdempotencyKeyHeader = None) -> ChainAccepted | JSONResponse:
    known, created = idempotency.create_once(
        session, principal.name, idempotency_key, "chains", body,
        lambda: chains.create_chain(session, settings, body, principal.name), lambda made: made[0].id)
    if created is None:
        chain = chains.get_chain(session, known)
        job = jobs.latest_job(session, chain.id)
        response.status_code = 200
    else:
        chain, job = created
    response.headers["Location"] = f"/jobs/{job.id}"
    return chains.accepted(chain, job)


@router.get("/chains", response_model=Page[ChainOut], responses=problem_responses(422))
def list_chains(session: SessionDep, principal: Reader, limit: Limit = 50, page_token: PageToken = None,
                source: str | None = None, status: ResourceStatus | None = None) -> Page[ChainOut]:
    return chains.list_chains(session, limit, page_token, source, status)


@router.get("/chains/{chain_id}", response_model=ChainOut, responses=problem_responses(404))
def get_chain(chain_id: str, session: SessionDep, principal: Reader) -> ChainOut:
    return chains.chain_out(session, chains.get_chain(session, chain_id))


@router.delete("/chains/{chain_id}", status_code=204, responses=problem_responses(404, 409))
def delete_chain(chain_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep, principal: Admin,
                 cascade: bool = False) -> Response:
    """Remove a chain, its anchors and their files; with `cascade=true` its models too (409 without it while models
    depend on the chain, and while a job of the chain or of its models is queued or running)."""
    chains.delete_chain(session, store, chain_id, settings.blob_grace_seconds, cascade)
    return Response(status_code=204)
