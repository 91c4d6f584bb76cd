from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import Admin, Builder, IdempotencyKeyHeader, Limit, PageToken, Reader, SessionDep, SettingsDep, StoreDep
from app.errors import problem_responses
from app.schemas import (
    EvaluationCreate,
    FitsOut,
    JobRef,
    ModelCreate,
    ModelOut,
    ModelPlan,
    Page,
    ResourceStatus,
    SignedLinks,
)
from app.services import fits, idempotency, jobs, models

if TYPE_CHECKING:
    from app.models import Model

router = APIRouter(tags=["models"], responses=problem_responses(400, 401, 403, 429))


@router.post("/models", status_code=202, response_model=ModelOut,
             responses={200: {"model": ModelOut, "description": "an identical model exists"},
                        **problem_responses(409, 413, 422)})
def create_model(body: ModelCreate, session: SessionDep, settings: SettingsDep, store: StoreDep, principal: Builder,
                 response: Response, idempotency_key: IdempotencyKeyHeader = None) -> ModelOut:
    """`fits` (instead of size or shape): the chain's largest model whose export plus KV cache fits the budget, its
    arithmetic and its export (made when the model is) in `fits`."""
    def create() -> tuple[Model, bool, FitsOut | None]:
        if body.fits is not None:
            return fits.request_model(session, settings, store, body, principal.name)
        return *models.request_model(session, settings, body, principal.name), None

    known, created = idempotency.create_once(session, principal.name, idempotency_key, "models", body, create,
                                             lambda made: made[0].id)
    model, started, arithmetic = created if created is not None else (models.get_model(session, known), False, None)
    out = models.model_out(session, model)
    out.fits = arithmetic
    response.status_code = 202 if started else 200
    if out.job is not None and started:
        response.headers["Location"] = out.job.url
    return out


@router.post("/models/plan", response_model=ModelPlan, responses=problem_responses(409, 413, 422))
def plan_model(body: ModelCreate, session: SessionDep, settings: SettingsDep, store: StoreDep,
               principal: Reader) -> ModelPlan:
    """What POST /models would make for this body (shape, exact count, estimate, an identical model; with fits, the
    arithmetic), made nothing."""
    if body.fits is not None:
        return fits.preview(session, settings, store, body)
    return models.preview(session, settings, body)


@router.post("/models/{model_id}/signed-links", response_model=SignedLinks, responses=problem_responses(404, 409))
def sign_links(model_id: str, request: Request, session: SessionDep, settings: SettingsDep,
               principal: Reader) -> SignedLinks:
    """Links to the model's files that work without a bearer header until `expires_at` (CBD_SIGNED_LINK_SECONDS)."""
    return models.signed_links(session, request.app.state.link_key, settings.signed_link_seconds, model_id)


@router.get("/models", response_model=Page[ModelOut], responses=problem_responses(422))
def list_models(session: SessionDep, principal: Reader, limit: Limit = 50, page_token: PageToken = None,
                chain: str | None = None, source: str | None = None, status: ResourceStatus | None = None,
                tag: Annotated[str | None, Query(max_length=64, description="models with this tag")] = None,
                ) -> Page[ModelOut]:
    return models.list_models(session, limit, page_token, chain, source, status, tag)


@router.get("/models/{model_id}", response_model=ModelOut, responses=problem_responses(404))
def get_model(model_id: str, session: SessionDep, principal: Reader) -> ModelOut:
    return models.model_out(session, models.get_model(session, model_id))


@router.delete("/models/{model_id}", status_code=204, responses=problem_responses(404, 409))
def delete_model(model_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep,
                 principal: Admin) -> Response:
    models.delete_model(session, store, model_id, settings.blob_grace_seconds)
    return Response(status_code=204)


@router.post("/models/{model_id}/evaluations", status_code=202, response_model=JobRef,
             responses=problem_responses(404, 409, 422))
def evaluate_model(model_id: str, body: EvaluationCreate, session: SessionDep, settings: SettingsDep,
                   principal: Builder, response: Response, idempotency_key: IdempotencyKeyHeader = None) -> JobRef:
    route = f"models/{model_id}/evaluations"
    known, created = idempotency.create_once(
        session, principal.name, idempotency_key, route, body,
        lambda: models.start_evaluation(session, settings, model_id, body, principal.name), lambda job: job.id)
    job = created if created is not None else jobs.get_job(session, known)
    response.headers["Location"] = f"/jobs/{job.id}"
    return jobs.job_ref(job)
