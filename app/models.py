"""SQLAlchemy 2 ORM models: chains, anchors, models, aliases and tags, exports, jobs, artifacts, tokens, idempotency
keys."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """Opaque ids that sort by creation time (keyset pagination orders by id)."""
    return f"{prefix}_{time.time_ns():016x}{secrets.token_hex(4)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Chain(Base):
    __tablename__ = "chains"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("chn"))
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(1000), index=True)
    family: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str] = mapped_column(String(64), default="anonymous")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    anchors: Mapped[list[Anchor]] = relationship(
        back_populates="chain", order_by="Anchor.index", cascade="all, delete-orphan", lazy="selectin"
    )


class Anchor(Base):
    __tablename__ = "anchors"
    __table_args__ = (UniqueConstraint("chain_id", "index"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("anc"))
    chain_id: Mapped[str] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    params: Mapped[int] = mapped_column(BigInteger)
    shape: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # config.json: the API rebuilds the architecture from it
    status: Mapped[str] = mapped_column(String(20), default="ready")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    chain: Mapped[Chain] = relationship(back_populates="anchors")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    identity: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the contract's identity tuple
    chain_id: Mapped[str] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(1000), index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    params: Mapped[int] = mapped_column(BigInteger)
    shape: Mapped[dict[str, Any]] = mapped_column(JSON)
    alpha: Mapped[float | None] = mapped_column(Float)
    alpha_request: Mapped[str] = mapped_column(String(20))  # "auto", "proportional" or the number (repr of a float)
    mix: Mapped[str] = mapped_column(String(10))  # cbd_engine.materialization.mixing.MIXES
    heal: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {steps, learning_rate}, or None: teacher-free
    init: Mapped[str] = mapped_column(String(20))
    seed: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(10))
    engine_version: Mapped[str] = mapped_column(String(20))
    small_anchor_id: Mapped[str] = mapped_column(ForeignKey("anchors.id", ondelete="CASCADE"))
    large_anchor_id: Mapped[str] = mapped_column(ForeignKey("anchors.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    owner: Mapped[str] = mapped_column(String(64), default="anonymous")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    """A name for one ready model, served as the Hub repository `cbd/<name>` too; moved by one guarded UPDATE
    (app/services/aliases.py). Removed with its model."""

    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    previous_model_id: Mapped[str | None] = mapped_column(String(40))  # before the last move (it may be deleted)
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelTag(Base):
    __tablename__ = "model_tags"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Export(Base):
    """A model in a device format (a GGUF file of one quantization), served in the model's sibling repository
    `cbd/<model id>-GGUF`; its file is an artifact owned by this row, so the model's own files never change."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("model_id", "format", "quant"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("exp"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(10))
    quant: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    owner: Mapped[str] = mapped_column(String(64), default="anonymous")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """The source of truth for long work: a worker holds a job by its lease and renews it with heartbeats."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    kind: Mapped[str] = mapped_column(String(30), index=True)  # JobKind: build_chain, materialize_model, ...
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    queue: Mapped[str] = mapped_column(String(10), default="cpu")
    subject_id: Mapped[str] = mapped_column(String(40), index=True)  # the chain or model being built
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[list[Any] | None] = mapped_column(JSON)  # sentences for the job's result (a flagged model)
    owner: Mapped[str] = mapped_column(String(64), default="anonymous", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    dispatched_at: Mapped[datetime | None] = mapped_column()  # last sent to the broker (None: not yet, or failed)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class Artifact(Base):
    """One file of a model or an anchor; its bytes live in the content-addressed store under its sha256."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_id: Mapped[str] = mapped_column(String(40), index=True)  # a model id or an anchor id
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tok"))
    name: Mapped[str] = mapped_column(String(200), default="")
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token; the token itself is not kept
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(100))
    body_sha256: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(40))  # None: claimed, the resource not yet made
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
