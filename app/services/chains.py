"""Knowledge chains: validation of POST /chains, the build (or registration) job, reading chains back."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import ApiError, not_found
from app.models import Anchor, Chain, Export, Job, Model
from app.schemas import AnchorOut, ChainAccepted, ChainCreate, ChainOut, Page
from app.services import jobs, sources
from app.services.files import artifacts, collect_blobs, files_out, remove_artifacts, remove_exports
from app.services.pagination import paginate, where_given
from app.settings import Settings
from app.storage import ArtifactStore


def resolve_spec(settings: Settings, body: ChainCreate) -> dict:
    """The request with every local path checked against the allowed roots and made absolute."""
    spec = body.model_dump(mode="json")
    spec["source"] = sources.checkpoint(settings, "source", body.source)
    for i, anchor in enumerate(body.anchors):
        if anchor.checkpoint is not None:
            field = f"anchors.{i}.checkpoint"
            spec["anchors"][i]["checkpoint"] = sources.checkpoint(settings, field, anchor.checkpoint)
    if body.bridge is not None and isinstance(body.bridge.model, str):
        spec["bridge"]["model"] = sources.checkpoint(settings, "bridge.model", body.bridge.model)
    if body.bridge is not None and body.bridge.tokenizer is not None:
        spec["bridge"]["tokenizer"] = str(sources.local_path(settings, "bridge.tokenizer", body.bridge.tokenizer))
    if body.dataset is not None and body.dataset.path is not None:
        spec["dataset"]["path"] = sources.dataset_file(settings, "dataset.path", body.dataset.path)
    if body.dataset is not None and body.dataset.hf is not None:
        spec["dataset"]["hf"] = sources.dataset_id(settings, "dataset.hf", body.dataset.hf)
    needs_data = any(a.distill for a in body.anchors) or body.bridge is not None
    if needs_data and body.dataset is None:
        raise sources.invalid("dataset", "distilling anchors needs a dataset (path or hf)")
    return spec


def is_registration(spec: dict) -> bool:
    """Every anchor an existing checkpoint kept as it is: nothing to train."""
    return spec.get("bridge") is None and all(a.get("checkpoint") and not a.get("distill", True)
                                              for a in spec["anchors"])


def estimate_seconds(spec: dict) -> float | None:
    if is_registration(spec):
        return None
    from cbd_engine.spec.estimate import estimate_chain_seconds

    try:
        return float(estimate_chain_seconds(spec))
    except ValueError as error:  # the engine's own checks of the recipe
        raise ApiError(422, str(error)) from None


def create_chain(session: Session, settings: Settings, body: ChainCreate, owner: str) -> tuple[Chain, jobs.Job]:
    spec = resolve_spec(settings, body)
    estimate = estimate_seconds(spec)
    if estimate is not None:
        jobs.check_budget(settings, estimate, "building this chain")
    jobs.check_capacity(session, settings, owner)
    chain = Chain(name=body.name, source=body.source, spec=spec, owner=owner, status="queued")
    session.add(chain)
    session.flush()
    job = jobs.new_job("build_chain", chain.id, jobs.queue_for(body.device, settings), owner, estimate=estimate)
    session.add(job)
    session.commit()
    jobs.dispatch(session, settings, job)
    return chain, job


def delete_chain(session: Session, store: ArtifactStore, chain_id: str, grace_seconds: float,
                 cascade: bool = False) -> None:
    """Remove a chain with its anchors, their jobs and files (blobs that nothing else names), and with `cascade` its
    models too. Refused (409) while models depend on it without `cascade`, and while a job of the chain or of one of
    its models is queued or running."""
    chain = get_chain(session, chain_id)
    models = list(session.scalars(select(Model.id).where(Model.chain_id == chain.id).order_by(Model.id)))
    if models and not cascade:
        shown = ", ".join(models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")
        raise ApiError(409, f"chain {chain.id} has {len(models)} models ({shown}); delete them first, or delete the "
                            "chain with ?cascade=true to remove them with it")
    subjects = [chain.id, *models, *session.scalars(select(Export.id).where(Export.model_id.in_(models)))]
    active = session.scalar(select(Job).where(Job.subject_id.in_(subjects), Job.status.in_(jobs.ACTIVE)).limit(1))
    if active is not None:
        raise ApiError(409, f"chain {chain.id} has a {active.status} {active.kind} job {active.id}; cancel it first")
    owners = [anchor.id for anchor in chain.anchors] + models
    blobs = remove_exports(session, models) | remove_artifacts(session, owners)
    session.execute(delete(Job).where(Job.subject_id.in_(subjects)))
    session.execute(delete(Model).where(Model.chain_id == chain.id))
    session.execute(delete(Anchor).where(Anchor.chain_id == chain.id))
    session.execute(delete(Chain).where(Chain.id == chain.id))
    session.commit()
    collect_blobs(session, store, blobs, grace_seconds)


def accepted(chain: Chain, job: jobs.Job) -> ChainAccepted:
    return ChainAccepted(id=chain.id, name=chain.name, status=chain.status, job=jobs.job_ref(job))


def get_chain(session: Session, chain_id: str) -> Chain:
    chain = session.get(Chain, chain_id)
    if chain is None:
        raise not_found("chain", chain_id)
    return chain


def anchor_out(session: Session, chain: Chain, anchor: Anchor) -> AnchorOut:
    rows = artifacts(session, anchor.id)
    base = f"/chains/{chain.id}/anchors/{anchor.index}/files"
    return AnchorOut(id=anchor.id, index=anchor.index, params=anchor.params, shape=anchor.shape, status=anchor.status,
                     metrics=anchor.metrics or {}, files=files_out(rows, base))


def chain_out(session: Session, chain: Chain) -> ChainOut:
    return ChainOut(id=chain.id, name=chain.name, source=chain.source, family=chain.family, status=chain.status,
                    anchors=[anchor_out(session, chain, a) for a in chain.anchors],
                    job=jobs.job_ref(jobs.latest_job(session, chain.id)), created_at=chain.created_at)


def list_chains(session: Session, limit: int, page_token: str | None, source: str | None, status: str | None) -> Page:
    query = where_given(select(Chain), (Chain.source, source), (Chain.status, status))
    rows, token = paginate(session, query, Chain.id, limit, page_token)
    return Page[ChainOut](items=[chain_out(session, c) for c in rows], next_page_token=token)


def get_anchor(session: Session, chain_id: str, index: int) -> Anchor:
    anchor = session.scalar(select(Anchor).where(Anchor.chain_id == chain_id, Anchor.index == index))
    if anchor is None:
        raise ApiError(404, f"chain {chain_id!r} has no anchor {index}")
    return anchor
