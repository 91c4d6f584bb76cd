from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import Builder, IdempotencyKeyHeader, Reader, SessionDep, SettingsDep
from app.errors import problem_responses
from app.schemas import ExportCreate, ExportOut
from app.services import exports, idempotency

router = APIRouter(tags=["exports"], responses=problem_responses(400, 401, 403, 404, 429))


@router.post("/models/{model_id}/exports", status_code=202, response_model=ExportOut,
             responses={200: {"model": ExportOut, "description": "this export exists"},
                        **problem_responses(409, 413, 422)})
def create_export(model_id: str, body: ExportCreate, session: SessionDep, settings: SettingsDep, principal: Builder,
                  response: Response, idempotency_key: IdempotencyKeyHeader = None) -> ExportOut:
    known, created = idempotency.create_once(
        session, principal.name, idempotency_key, f"models/{model_id}/exports", body,
        lambda: exports.request_export(session, settings, model_id, body, principal.name), lambda made: made[0].id)
    export, started = created if created is not None else (exports.get_export(session, model_id, known), False)
    out = exports.export_out(session, export)
    response.status_code = 202 if started else 200
    if out.job is not None and started:
        response.headers["Location"] = out.job.url
    return out


@router.get("/models/{model_id}/exports", response_model=list[ExportOut])
def list_exports(model_id: str, session: SessionDep, principal: Reader) -> list[ExportOut]:
    return [exports.export_out(session, e) for e in exports.list_exports(session, model_id)]


@router.get("/models/{model_id}/exports/{export_id}", response_model=ExportOut)
def get_export(model_id: str, export_id: str, session: SessionDep, principal: Reader) -> ExportOut:
    return exports.export_out(session, exports.get_export(session, model_id, export_id))
