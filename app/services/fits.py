"""Models that fit a memory budget (POST /models with `fits`): the chain's largest model whose export plus KV cache
fits (cbd_engine/spec/fits.py), then requested as a shape request for that shape (the same identity,
deduplication, estimate and job as any model), with its export requested too: made at once for a ready model,
else queued behind it (exports.request_export)."""

from __future__ import annotations

import json
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Artifact, Chain, Model
from app.schemas import ExportCreate, FitsOut, ModelCreate, ModelPlan, ShapeIn
from app.services import exports, models
from app.services.sources import invalid
from app.settings import Settings
from app.storage import ArtifactStore
from cbd_engine.spec.export import gguf_tokenizer_bytes
from cbd_engine.spec.families import ModelSpec
from cbd_engine.spec.fits import Budget, Fit, arithmetic, fit_budget
from cbd_engine.spec.shapes import Shape


@lru_cache(maxsize=64)
def _tokenizer_bytes(store: ArtifactStore, sha256: str, vocab_size: int) -> int:
    """What the chain's tokenizer.json adds to a GGUF file; read once per file (anchors never change)."""
    with store.open(sha256) as handle:
        return gguf_tokenizer_bytes(json.load(handle), vocab_size)


@lru_cache(maxsize=1024)
def _fit(config: str, anchors: tuple[Shape, ...], budget: Budget, tokenizer_bytes: int) -> Fit:
    """The budget rule, memoized as the size rule is (models._solve)."""
    return fit_budget(ModelSpec.from_config(json.loads(config)).architecture, anchors, budget, tokenizer_bytes)


def fit_in_chain(session: Session, store: ArtifactStore, chain: Chain, budget: Budget) -> Fit:
    """The chain's largest model within the budget (422 below its smallest, stating that model's bytes)."""
    anchors = sorted((a for a in chain.anchors if a.status == "ready"), key=lambda a: -a.params)
    if len(anchors) < 2:
        raise invalid("chain", f"chain {chain.id} has fewer than two ready anchors")
    largest = anchors[0]
    tokenizer = session.scalar(select(Artifact).where(Artifact.owner_id == largest.id,
                                                      Artifact.name == "tokenizer.json"))
    if tokenizer is None:
        raise invalid("fits", f"chain {chain.id}'s anchors have no tokenizer.json, which a GGUF file carries")
    try:
        tokenizer_bytes = _tokenizer_bytes(store, tokenizer.sha256, largest.shape["vocab_size"])
        return _fit(json.dumps(largest.config, sort_keys=True), tuple(Shape.from_dict(a.shape) for a in anchors),
                    budget, tokenizer_bytes)
    except ValueError as error:  # ShapeError; a tokenizer a GGUF file cannot carry
        raise invalid("fits", f"chain {chain.id}: {error}") from None


def shape_request(session: Session, store: ArtifactStore, body: ModelCreate) -> tuple[ModelCreate, Fit]:
    """The request as a shape request in the newest ready chain where the budget holds a model, and its fit."""
    budget = body.fits.budget()
    errors = []
    for chain in models.ready_chains(session, body):
        try:
            fit = fit_in_chain(session, store, chain, budget)
        except ApiError as error:
            if body.chain is not None:
                raise
            errors.append(error.detail)
            continue
        shape = ShapeIn(**fit.chosen.shape.to_dict())
        return body.model_copy(update={"fits": None, "source": None, "chain": chain.id, "shape": shape}), fit
    raise ApiError(422, "; ".join(errors), errors=[{"field": "fits", "message": "; ".join(errors)}])


def preview(session: Session, settings: Settings, store: ArtifactStore, body: ModelCreate) -> ModelPlan:
    shaped, fit = shape_request(session, store, body)
    planned = models.preview(session, settings, shaped)
    planned.fits = FitsOut(**arithmetic(fit, body.fits.budget()))
    return planned


def request_model(session: Session, settings: Settings, store: ArtifactStore, body: ModelCreate,
                  owner: str) -> tuple[Model, bool, FitsOut]:
    """(model, started, arithmetic with the export): the model as any shape request makes it, and its export,
    which keeps the arithmetic in its metrics."""
    shaped, fit = shape_request(session, store, body)
    model, started = models.request_model(session, settings, shaped, owner)
    out = FitsOut(**arithmetic(fit, body.fits.budget()))
    request = ExportCreate(format=body.fits.format, quant=body.fits.quant, device=body.device)
    export, _ = exports.request_export(session, settings, model.id, request, owner,
                                       fits=out.model_dump(mode="json", exclude={"export"}))
    out.export = exports.export_out(session, export)
    return model, started, out
