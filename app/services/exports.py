"""Exports of a ready model to device formats (GGUF, ONNX), each a row with its own job and files, served in the
model's sibling repository per format, `cbd/<model id>-GGUF` and `cbd/<model id>-ONNX` (the Hub community's
convention), so the model's own revision never changes when a quantization is added."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError, not_found
from app.models import Anchor, Export, Job, Model
from app.schemas import ExportCreate, ExportOut
from app.services import jobs
from app.services.files import artifacts, files_out
from app.services.models import RETRYABLE, get_model
from app.settings import Settings
from cbd_engine.spec.export import check_family, repo_suffix

EXPORT_BYTES_PER_SECOND = 20e6  # quantizing in numpy and writing (SmolLM2-135M: about 3 s for 145 MB here)


def sibling_repo(model_id: str, fmt: str) -> str:
    return f"{model_id}-{repo_suffix(fmt)}"


def export_out(session: Session, export: Export) -> ExportOut:
    repo = sibling_repo(export.model_id, export.format)
    rows = artifacts(session, export.id) if export.status == "ready" else []
    return ExportOut(id=export.id, model=export.model_id, format=export.format, quant=export.quant,
                     status=export.status, metrics=export.metrics or {},
                     files=files_out(rows, f"/cbd/{repo}/resolve/main"), hub_repo_id=f"cbd/{repo}",
                     job=jobs.job_ref(jobs.latest_job(session, export.id)), created_at=export.created_at)


def estimate_seconds(model: Model) -> float:
    """Reading the model's float32 weights, writing the export, then the validation rows and samples in its runtime
    (the model's own measuring time, which the materialization estimated)."""
    measured = (model.provenance or {}).get("service", {})
    return 4 * model.params / EXPORT_BYTES_PER_SECOND + 2 * float(measured.get("publish_seconds", 1.0)) + 30.0


def request_export(session: Session, settings: Settings, model_id: str, body: ExportCreate, owner: str,
                   fits: dict | None = None) -> tuple[Export, bool]:
    """(export, started): an export of this model, format and quant exists once; a failed one is made again.

    A plain request needs a ready model (409). A fits request's export (`fits`: its arithmetic, kept in the
    export's metrics) may wait for its model: a row with no job, whose job the worker makes in the transaction that
    makes the model ready (`release_waiting`), or that fails with the model (subjects.mark_subject). The export row
    is written first, then the model's status read under a lock on the model's row, which conflicts with the write
    by which the worker's publish marks the model ready before it looks for waiting exports (SQLite: the database's
    write lock, held by either from its first write): a model made ready meanwhile is seen ready here and the job
    made here, otherwise the publish sees the row and makes the job; never both, never neither."""
    model = get_model(session, model_id)
    if fits is None and model.status != "ready":
        raise ApiError(409, f"model {model.id} is {model.status}; exports need a ready model")
    try:  # the model's config is its larger anchor's with another shape: the same model type
        check_family(body.format, session.get(Anchor, model.large_anchor_id).config.get("model_type"))
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    existing = session.scalar(select(Export).where(Export.model_id == model.id, Export.format == body.format,
                                                   Export.quant == body.quant))
    if existing is not None and existing.status not in RETRYABLE:
        return existing, False
    metrics = {"fits": fits} if fits is not None else {}
    if existing is not None:
        retried = session.execute(update(Export).where(Export.id == existing.id, Export.status.in_(RETRYABLE))
                                  .values(status="queued", metrics=metrics)
                                  .execution_options(synchronize_session=False))
        if retried.rowcount != 1:
            session.rollback()
            return get_export(session, model.id, existing.id), False
        export = existing
    else:
        export = Export(model_id=model.id, format=body.format, quant=body.quant, status="queued", metrics=metrics,
                        owner=owner)
        session.add(export)
        try:
            session.flush()
        except IntegrityError:  # an identical request won the race
            session.rollback()
            return session.scalar(select(Export).where(Export.model_id == model.id, Export.format == body.format,
                                                       Export.quant == body.quant)), False
    # FOR SHARE: it waits for a publish's (or a failure's) uncommitted write of the model row, and they for it;
    # two of these requests do not wait for each other
    status = session.scalar(select(Model.status).where(Model.id == model.id).with_for_update(read=True))
    if status != "ready":  # waiting for its model (a fits request's): its job comes with the model
        if status in RETRYABLE:  # the model failed or was cancelled meanwhile: the export with it
            session.execute(update(Export).where(Export.id == export.id).values(status=status))
        session.commit()
        return export, True
    jobs.check_capacity(session, settings, owner)
    job = jobs.new_job("export_model", export.id, jobs.queue_for(body.device, settings), owner,
                       estimate=estimate_seconds(model))
    session.add(job)
    session.commit()
    jobs.dispatch(session, settings, job)
    return export, True


def release_waiting(session: Session, model: Model, queue: str) -> list[Job]:
    """Jobs for the exports waiting for `model` (a fits request's), on the model's queue: called in the transaction
    that makes the model ready, after its write (which takes the model's row lock). Until then every queued export of
    the model is a waiting one: a plain request needs a ready model."""
    waiting = session.scalars(select(Export).where(Export.model_id == model.id, Export.status == "queued"))
    made = [jobs.new_job("export_model", export.id, queue, export.owner, estimate=estimate_seconds(model))
            for export in waiting]
    session.add_all(made)
    return made


def get_export(session: Session, model_id: str, export_id: str) -> Export:
    export = session.get(Export, export_id)
    if export is None or export.model_id != model_id:
        raise not_found("export", export_id)
    return export


def list_exports(session: Session, model_id: str) -> list[Export]:
    get_model(session, model_id)
    return list(session.scalars(select(Export).where(Export.model_id == model_id).order_by(Export.id)))


def ready_exports(session: Session, model_id: str, fmt: str) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.model_id == model_id, Export.format == fmt,
                                                     Export.status == "ready").order_by(Export.quant)))
