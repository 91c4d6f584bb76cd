"""Materialized models: size -> (chain, bracketing anchors, shape), identity and deduplication, jobs, reading back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import cbd_engine
from app.errors import ApiError, not_found
from app.models import Anchor, Artifact, Chain, Job, Model
from app.schemas import EvaluationCreate, ModelCreate, ModelOut, Page
from app.services import jobs
from app.services.files import artifacts, files_out
from app.services.pagination import paginate, where_given
from app.services.sources import dataset_file, invalid
from app.settings import Settings
from app.storage import ArtifactStore
from cbd_engine.evaluation import TASK_TYPES
from cbd_engine.families import ModelSpec
from cbd_engine.shapes import SIZE_TOLERANCE, Shape, ShapeError, format_size, parse_size, solve_shape

RETRYABLE = ("failed", "cancelled")


@dataclass(frozen=True)
class Plan:
    """Where a request lands: the chain, the two bracketing anchors, and the exact shape and count."""

    chain: Chain
    small: Anchor
    large: Anchor
    shape: Shape
    params: int
    size: int | None


def _spec(anchor: Anchor) -> ModelSpec:
    return _spec_of(json.dumps(anchor.config, sort_keys=True))


@lru_cache(maxsize=256)
def _spec_of(config: str) -> ModelSpec:
    return ModelSpec.from_config(json.loads(config))


@lru_cache(maxsize=4096)
def _solve(config: str, small: Shape, large: Shape, target: int) -> tuple[Shape, int]:
    """The deterministic size -> shape rule, memoized: anchors never change once ready, so cached requests are cheap."""
    arch = _spec_of(config).architecture
    shape = solve_shape(arch, small, large, target)
    return shape, arch.num_params(shape)


def _pairs(chain: Chain) -> list[tuple[Anchor, Anchor]]:
    """Adjacent (small, large) anchors, largest first."""
    ordered = sorted((a for a in chain.anchors if a.status == "ready"), key=lambda a: -a.params)
    return [(ordered[i + 1], ordered[i]) for i in range(len(ordered) - 1)]


def _brackets(small: Anchor, large: Anchor, target: int) -> bool:
    return small.params * (1 - SIZE_TOLERANCE) <= target <= large.params * (1 + SIZE_TOLERANCE)


def _range_text(chain: Chain) -> str:
    params = [a.params for a in chain.anchors if a.status == "ready"]
    if len(params) < 2:
        return f"chain {chain.id} has fewer than two ready anchors"
    low, high = min(params), max(params)
    return f"chain {chain.id} serves {format_size(low)} to {format_size(high)} ({low} to {high})"


def _plan_in_chain(chain: Chain, body: ModelCreate) -> Plan:
    pairs = _pairs(chain)
    if not pairs:
        raise invalid("chain", _range_text(chain))
    if body.shape is not None:
        chain_shape = Shape.from_dict(pairs[0][1].shape)
        try:
            shape = Shape.from_dict(body.shape.as_dict(), chain=chain_shape)
            arch = _spec(pairs[0][1]).architecture
            params = arch.num_params(shape)
            arch.validate(shape)
        except ShapeError as error:
            raise invalid("shape", str(error)) from None
        for small, large in pairs:
            if _brackets(small, large, params):
                return Plan(chain, small, large, shape, params, None)
        raise invalid("shape", f"this shape has {params} parameters; {_range_text(chain)}")
    target = parse_size(body.size)
    for small, large in pairs:
        if _brackets(small, large, target):
            config = json.dumps(large.config, sort_keys=True)
            try:
                shape, params = _solve(config, Shape.from_dict(small.shape), Shape.from_dict(large.shape), target)
            except ShapeError as error:
                raise invalid("size", str(error)) from None
            return Plan(chain, small, large, shape, params, target)
    raise invalid("size", f"size {format_size(target)} ({target}) is outside the range: {_range_text(chain)}")


def plan(session: Session, body: ModelCreate) -> Plan:
    if body.chain is not None:
        chain = session.get(Chain, body.chain)
        if chain is None:
            raise invalid("chain", f"no chain {body.chain!r}")
        if chain.status != "ready":
            raise ApiError(409, f"chain {chain.id} is {chain.status}, not ready")
        return _plan_in_chain(chain, body)
    chains = list(session.scalars(select(Chain).where(Chain.source == body.source, Chain.status == "ready")
                                  .order_by(Chain.id.desc())))
    if not chains:
        raise invalid("source", f"no ready chain of source {body.source!r}; build one with POST /chains")
    errors = []
    for chain in chains:  # the newest ready chain whose anchors bracket the request
        try:
            return _plan_in_chain(chain, body)
        except ApiError as error:
            errors.append(error.detail)
    raise invalid("size" if body.size is not None else "shape", "; ".join(errors))


def alpha_key(alpha: float | str | None) -> str:
    return "default" if alpha is None else ("auto" if alpha == "auto" else repr(float(alpha)))


def identity(p: Plan, body: ModelCreate) -> str:
    """The contract's identity: (chain, shape, alpha, init, seed, dtype, engine version)."""
    key = [p.chain.id, p.shape.to_dict(), alpha_key(body.alpha), body.init, body.seed, body.dtype,
           cbd_engine.__version__]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


CALIBRATION_TOKENS_PER_ROW = 512
CPU_FLOPS_PER_SECOND = 1.8e11  # the engine's measured CPU throughput (cbd_engine.chain.FLOPS_PER_SECOND)


def estimate_seconds(settings: Settings, p: Plan, body: ModelCreate) -> float:
    """Reading both anchors and writing the model (float32 bytes), plus activation importance on the calibration rows
    (a forward pass of each anchor); "auto" alpha also scores nine candidates."""
    moved = 4 * (p.small.params + p.large.params + p.params)
    seconds = moved / settings.materialize_bytes_per_second
    if (p.chain.spec.get("dataset") or {}).get("path"):
        tokens = settings.calibration_rows * CALIBRATION_TOKENS_PER_ROW
        seconds += 2 * tokens * (p.small.params + p.large.params) / CPU_FLOPS_PER_SECOND
    return seconds * (10 if body.alpha == "auto" else 1)


def request_model(session: Session, settings: Settings, body: ModelCreate, owner: str) -> tuple[Model, bool]:
    """(model, started): an identical request gets the existing model; two at once materialize once."""
    p = plan(session, body)
    key = identity(p, body)
    existing = session.scalar(select(Model).where(Model.identity == key))
    if existing is not None and existing.status not in RETRYABLE:
        return existing, False
    estimate = estimate_seconds(settings, p, body)
    jobs.check_budget(settings, estimate, f"materializing {format_size(p.params)}")
    jobs.check_capacity(session, settings, owner)
    queue = jobs.queue_for(body.device, settings)
    if existing is not None:  # a failed or cancelled model is made again on request
        existing.status = "queued"
        job = jobs.new_job("materialize_model", existing.id, queue, owner, estimate=estimate)
        session.add(job)
        session.commit()
        jobs.dispatch(session, settings, job)
        return existing, True
    model = Model(identity=key, chain_id=p.chain.id, source=p.chain.source, size=p.size, params=p.params,
                  shape=p.shape.to_dict(), alpha=body.alpha if isinstance(body.alpha, float | int) else None,
                  alpha_request=alpha_key(body.alpha), init=body.init, seed=body.seed, dtype=body.dtype,
                  engine_version=cbd_engine.__version__, small_anchor_id=p.small.id, large_anchor_id=p.large.id,
                  status="queued", metrics={}, provenance={}, owner=owner)
    session.add(model)
    try:
        session.flush()
    except IntegrityError:  # an identical request won the race: return its model
        session.rollback()
        return session.scalar(select(Model).where(Model.identity == key)), False
    job = jobs.new_job("materialize_model", model.id, queue, owner, estimate=estimate)
    session.add(job)
    session.commit()
    jobs.dispatch(session, settings, job)
    return model, True


def get_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def model_out(session: Session, model: Model) -> ModelOut:
    alpha = model.alpha if model.alpha is not None or model.alpha_request == "default" else model.alpha_request
    rows = artifacts(session, model.id) if model.status == "ready" else []
    return ModelOut(id=model.id, chain=model.chain_id, source=model.source, size=model.size, params=model.params,
                    shape=model.shape, alpha=alpha, init=model.init, seed=model.seed, dtype=model.dtype,
                    engine_version=model.engine_version, anchors=[model.small_anchor_id, model.large_anchor_id],
                    status=model.status, metrics=model.metrics or {},
                    files=files_out(rows, f"/models/{model.id}/files"),
                    provenance=model.provenance or {}, job=jobs.job_ref(jobs.latest_job(session, model.id)),
                    hub_repo_id=f"cbd/{model.id}", created_at=model.created_at)


def list_models(session: Session, limit: int, page_token: str | None, chain: str | None, source: str | None,
                status: str | None) -> Page:
    query = where_given(select(Model), (Model.chain_id, chain), (Model.source, source), (Model.status, status))
    rows, token = paginate(session, query, Model.id, limit, page_token)
    return Page[ModelOut](items=[model_out(session, m) for m in rows], next_page_token=token)


def delete_model(session: Session, store: ArtifactStore, model_id: str) -> None:
    """Remove the model, its rows and the blobs no other model or anchor still uses."""
    model = get_model(session, model_id)
    active = jobs.latest_job(session, model.id)
    if active is not None and active.status in jobs.ACTIVE:
        raise ApiError(409, f"model {model.id} has a {active.status} job {active.id}; cancel it first")
    rows = artifacts(session, model.id)
    for row in rows:
        session.delete(row)
    session.delete(model)
    session.commit()
    for row in rows:
        if session.scalar(select(Artifact.id).where(Artifact.sha256 == row.sha256).limit(1)) is None:
            store.delete(row.sha256)


def evaluation_task(settings: Settings, index: int, task: str) -> str:
    """`validation_loss`, or `cbd eval`'s TYPE=PATH with the path checked against the allowed roots."""
    if task == "validation_loss":
        return task
    kind, sep, path = task.partition("=")
    if not sep or kind not in TASK_TYPES:
        types = ", ".join(TASK_TYPES)
        raise invalid(f"tasks.{index}", f"must be validation_loss or TYPE=PATH with TYPE one of {types}")
    return f"{kind}={dataset_file(settings, f'tasks.{index}', path)}"


def start_evaluation(session: Session, settings: Settings, model_id: str, body: EvaluationCreate, owner: str) -> Job:
    model = get_model(session, model_id)
    if model.status != "ready":
        raise ApiError(409, f"model {model.id} is {model.status}; evaluations need a ready model")
    tasks = [evaluation_task(settings, i, task) for i, task in enumerate(body.tasks)]
    jobs.check_capacity(session, settings, owner)
    payload = {**body.model_dump(mode="json"), "tasks": tasks}
    job = jobs.new_job("evaluate_model", model.id, jobs.queue_for(body.device, settings), owner, payload=payload)
    session.add(job)
    session.commit()
    jobs.dispatch(session, settings, job)
    return job
