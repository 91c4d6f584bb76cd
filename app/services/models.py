"""Materialized models: size -> (chain, bracketing anchors, shape), identity and deduplication, jobs, reading back."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import NoReturn

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import cbd_engine
from app.errors import ApiError, not_found
from app.models import Alias, Anchor, Chain, Export, Job, Model, ModelTag
from app.schemas import EvaluationCreate, FileOut, HealIn, ModelCreate, ModelOut, ModelPlan, ModelRef, Page, SignedLinks
from app.services import jobs, links
from app.services.files import artifacts, collect_blobs, files_out, remove_artifacts, remove_exports
from app.services.pagination import paginate, where_given
from app.services.sources import dataset_file, invalid
from app.settings import Settings
from app.storage import ArtifactStore
from cbd_engine.spec.chain import distillation_settings
from cbd_engine.spec.estimate import DECODING_SLOWDOWN, FLOPS_PER_SECOND, distillation_flops
from cbd_engine.spec.families import ModelSpec
from cbd_engine.spec.options import ALPHA_MODES, DEV_ROWS, IMPORTANCE_ROWS, SAMPLE_PROMPTS, SAMPLE_TOKENS, TASK_TYPES
from cbd_engine.spec.shapes import SIZE_TOLERANCE, Shape, ShapeError, format_size, parse_size, solve_shape

RETRYABLE = ("failed", "cancelled")


@dataclass(frozen=True)
class Landing:
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


def _plan_in_chain(chain: Chain, body: ModelCreate) -> Landing:
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
                return Landing(chain, small, large, shape, params, None)
        raise invalid("shape", f"this shape has {params} parameters; {_range_text(chain)}")
    target = parse_size(body.size)
    for small, large in pairs:
        if _brackets(small, large, target):
            config = json.dumps(large.config, sort_keys=True)
            try:
                shape, params = _solve(config, Shape.from_dict(small.shape), Shape.from_dict(large.shape), target)
            except ShapeError as error:
                raise invalid("size", str(error)) from None
            return Landing(chain, small, large, shape, params, target)
    raise invalid("size", f"size {format_size(target)} ({target}) is outside the range: {_range_text(chain)}")


def ready_chains(session: Session, body: ModelCreate) -> list[Chain]:
    """The chains a request may land in: the one it names (409 unless ready), else its source's ready chains,
    newest first (409 while one is being built, 422 when there is none)."""
    if body.chain is not None:
        chain = session.get(Chain, body.chain)
        if chain is None:
            raise invalid("chain", f"no chain {body.chain!r}")
        if chain.status != "ready":
            raise ApiError(409, f"chain {chain.id} is {chain.status}, not ready")
        return [chain]
    chains = list(session.scalars(select(Chain).where(Chain.source == body.source, Chain.status == "ready")
                                  .order_by(Chain.id.desc())))
    if not chains:
        _no_ready_chain(session, body.source)
    return chains


def plan(session: Session, body: ModelCreate) -> Landing:
    chains = ready_chains(session, body)
    if body.chain is not None:
        return _plan_in_chain(chains[0], body)
    errors = []
    for chain in chains:  # the newest ready chain whose anchors bracket the request
        try:
            return _plan_in_chain(chain, body)
        except ApiError as error:
            errors.append(error.detail)
    raise invalid("size" if body.size is not None else "shape", "; ".join(errors))


def _no_ready_chain(session: Session, source: str) -> NoReturn:
    """409 while a chain of the source is being built (the demo's, right after `cbd serve --demo`), else 422."""
    building = session.scalar(select(Chain).where(Chain.source == source, Chain.status.in_(jobs.ACTIVE))
                              .order_by(Chain.id.desc()).limit(1))
    if building is None:
        raise invalid("source", f"no ready chain of source {source!r}; build one with POST /chains")
    job = jobs.latest_job(session, building.id)
    raise ApiError(409, f"chain {building.id} of source {source!r} is being built ({building.status}); retry when it "
                        f"is ready" + (f" (progress: GET /jobs/{job.id})" if job else ""))


def alpha_key(alpha: float | str | None) -> str:
    """alpha as requested, for the identity: "auto" (null too), "proportional", or the number's repr."""
    return "auto" if alpha is None else alpha if isinstance(alpha, str) else repr(float(alpha))


def alpha_requested(key: str) -> float | str:
    return key if key in ALPHA_MODES else float(key)


def heal_key(heal: HealIn | None) -> dict | None:
    return heal.model_dump() if heal is not None else None


def identity(p: Landing, body: ModelCreate) -> str:
    """The contract's identity: (chain, shape, alpha as requested, mix, heal, init, seed, dtype, engine version)."""
    key = [p.chain.id, p.shape.to_dict(), alpha_key(body.alpha), body.mix, heal_key(body.heal), body.init, body.seed,
           body.dtype, cbd_engine.__version__]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# For estimates (FLOPs at the engine's figures per device, spec/estimate.py FLOPS_PER_SECOND): what the worker runs
TOKENS_PER_ROW = 200  # a calibration, dev or validation row, prompt and response
FIXED_PASSES = 4  # any alpha: the model and alpha 0 scored for its quality, and the anchors' own dev losses
KNOT_PASSES = 14  # alpha "auto", the first time near a size: the 2 knots' grids of 7 beside it (cached after)


def forward_seconds(params: int, tokens: float, flops_per_second: float) -> float:
    return 2 * params * tokens / flops_per_second


def rows_seconds(params: int, rows: int, flops_per_second: float) -> float:
    """A forward pass over `rows` rows (importance, scoring candidates, validation)."""
    return forward_seconds(params, rows * TOKENS_PER_ROW, flops_per_second)


def samples_seconds(params: int, flops_per_second: float) -> float:
    """Greedy answers, token by token (far below training throughput)."""
    tokens = len(SAMPLE_PROMPTS) * (TOKENS_PER_ROW + SAMPLE_TOKENS * DECODING_SLOWDOWN)
    return forward_seconds(params, tokens, flops_per_second)


def heal_seconds(p: Landing, heal: HealIn, recipe: dict, flops_per_second: float) -> float:
    """K distillation steps of the chain's settings (the engine's count), the larger anchor teaching."""
    return distillation_flops({**recipe, "eval_every": 0}, heal.steps, p.params, p.large.params) / flops_per_second


def estimate_seconds(settings: Settings, p: Landing, body: ModelCreate, queue: str) -> float:
    """Reading both anchors and writing the model (float32 bytes); activation importance of both anchors on the
    calibration's training rows and alpha "auto"'s knots (the first time: both are cached) and the dev rows scored
    for quality; heal steps when asked (422 when the chain's settings cannot heal); the validation loss and greedy
    samples."""
    speed = FLOPS_PER_SECOND[queue]
    seconds = 4 * (p.small.params + p.large.params + p.params) / settings.materialize_bytes_per_second
    if body.init in ("cbd", "single"):
        seconds += rows_seconds(p.small.params + p.large.params, IMPORTANCE_ROWS, speed)
    if body.init == "cbd":
        passes = FIXED_PASSES + (KNOT_PASSES if alpha_key(body.alpha) == "auto" else 0)
        seconds += rows_seconds(p.params, passes * DEV_ROWS, speed)
    if body.heal is not None:
        seconds += heal_seconds(p, body.heal, heal_recipe(p.chain), speed)
    return seconds + rows_seconds(p.params, settings.validation_rows, speed) + samples_seconds(p.params, speed)


def heal_recipe(chain: Chain) -> dict:
    """The chain's distillation settings, which heal steps use (422 when the engine refuses them)."""
    try:
        return distillation_settings(chain.spec)
    except ValueError as error:
        raise invalid("heal", f"chain {chain.id}'s distillation settings cannot heal a model: {error}") from None


def budgeted_estimate(settings: Settings, p: Landing, body: ModelCreate, queue: str) -> float:
    """The job's estimate; 422 above the server's budget."""
    estimate = estimate_seconds(settings, p, body, queue)
    jobs.check_budget(settings, estimate, f"materializing {format_size(p.params)}")
    return estimate


def preview(session: Session, settings: Settings, body: ModelCreate) -> ModelPlan:
    """POST /models without its effects: the shape, the exact count, the estimate, and an identical model (the one
    POST /models would answer with), or the same errors."""
    p = plan(session, body)
    existing = session.scalar(select(Model).where(Model.identity == identity(p, body)))
    queue = jobs.queue_for(body.device, settings)
    estimate = budgeted_estimate(settings, p, body, queue)
    reused = existing is not None and existing.status not in RETRYABLE
    return ModelPlan(chain=p.chain.id, anchors=[p.small.id, p.large.id], size=p.size, params=p.params,
                     shape=p.shape.to_dict(), queue=queue, estimated_seconds=estimate,
                     existing=ModelRef(id=existing.id, status=existing.status, url=f"/models/{existing.id}")
                     if reused else None)


def request_model(session: Session, settings: Settings, body: ModelCreate, owner: str) -> tuple[Model, bool]:
    """(model, started): an identical request gets the existing model; two at once materialize once."""
    p = plan(session, body)
    key = identity(p, body)
    existing = session.scalar(select(Model).where(Model.identity == key))
    if existing is not None and existing.status not in RETRYABLE:
        return existing, False
    queue = jobs.queue_for(body.device, settings)
    estimate = budgeted_estimate(settings, p, body, queue)
    jobs.check_capacity(session, settings, owner)
    if existing is not None:  # a failed or cancelled model is made again on request, by one of concurrent requests
        retried = session.execute(update(Model).where(Model.id == existing.id, Model.status.in_(RETRYABLE))
                                  .values(status="queued").execution_options(synchronize_session=False))
        if retried.rowcount != 1:  # another request queued it first: that one's job makes it
            session.rollback()
            return get_model(session, existing.id), False
        job = jobs.new_job("materialize_model", existing.id, queue, owner, estimate=estimate)
        session.add(job)
        session.commit()
        jobs.dispatch(session, settings, job)
        return existing, True
    model = Model(identity=key, chain_id=p.chain.id, source=p.chain.source, size=p.size, params=p.params,
                  shape=p.shape.to_dict(), alpha=body.alpha if isinstance(body.alpha, float | int) else None,
                  alpha_request=alpha_key(body.alpha), mix=body.mix, heal=heal_key(body.heal), init=body.init,
                  seed=body.seed, dtype=body.dtype, engine_version=cbd_engine.__version__, small_anchor_id=p.small.id,
                  large_anchor_id=p.large.id, status="queued", metrics={}, provenance={}, owner=owner)
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
    requested = alpha_requested(model.alpha_request)
    alpha = model.alpha if model.status == "ready" or not isinstance(requested, str) else requested
    rows = artifacts(session, model.id) if model.status == "ready" else []
    return ModelOut(id=model.id, chain=model.chain_id, source=model.source, size=model.size, params=model.params,
                    shape=model.shape, alpha=alpha, alpha_request=requested, mix=model.mix, heal=model.heal,
                    init=model.init, seed=model.seed, dtype=model.dtype,
                    engine_version=model.engine_version, anchors=[model.small_anchor_id, model.large_anchor_id],
                    status=model.status, metrics=model.metrics or {},
                    files=files_out(rows, f"/models/{model.id}/files"),
                    provenance=model.provenance or {}, job=jobs.job_ref(jobs.latest_job(session, model.id)),
                    hub_repo_id=f"cbd/{model.id}",
                    aliases=list(session.scalars(select(Alias.name).where(Alias.model_id == model.id)
                                                 .order_by(Alias.name))),
                    tags=list(session.scalars(select(ModelTag.tag).where(ModelTag.model_id == model.id)
                                              .order_by(ModelTag.tag))),
                    created_at=model.created_at)


def signed_links(session: Session, key: bytes, seconds: float, model_id: str) -> SignedLinks:
    """Links to each file of a ready model that work without a bearer header for `seconds`."""
    model = get_model(session, model_id)
    if model.status != "ready":
        raise ApiError(409, f"model {model.id} is {model.status}; its files appear when it is ready")
    expires = int(time.time() + seconds)
    files = [FileOut(**{**item.model_dump(), "url": links.sign(key, item.url, expires)})
             for item in files_out(artifacts(session, model.id), f"/models/{model.id}/files")]
    return SignedLinks(expires_at=datetime.fromtimestamp(expires, timezone.utc), files=files)


def list_models(session: Session, limit: int, page_token: str | None, chain: str | None, source: str | None,
                status: str | None, tag: str | None) -> Page:
    query = where_given(select(Model), (Model.chain_id, chain), (Model.source, source), (Model.status, status))
    if tag:
        query = query.where(Model.id.in_(select(ModelTag.model_id).where(ModelTag.tag == tag)))
    rows, token = paginate(session, query, Model.id, limit, page_token)
    return Page[ModelOut](items=[model_out(session, m) for m in rows], next_page_token=token)


def delete_model(session: Session, store: ArtifactStore, model_id: str, grace_seconds: float) -> None:
    """Remove the model, its rows and the blobs no other model or anchor still uses."""
    model = get_model(session, model_id)
    subjects = [model.id, *session.scalars(select(Export.id).where(Export.model_id == model.id))]
    active = session.scalar(select(Job).where(Job.subject_id.in_(subjects), Job.status.in_(jobs.ACTIVE)).limit(1))
    if active is not None:
        raise ApiError(409, f"model {model.id} has a {active.status} {active.kind} job {active.id}; cancel it first")
    blobs = remove_exports(session, [model.id]) | remove_artifacts(session, [model.id])
    session.delete(model)
    session.commit()
    collect_blobs(session, store, blobs, grace_seconds)


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
