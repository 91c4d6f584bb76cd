"""Idempotency-Key on POST: the same key with the same body returns the same resource; another body is a 409."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import IdempotencyKey


def body_hash(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def lookup(session: Session, owner: str, key: str | None, route: str, body: BaseModel) -> str | None:
    """The resource id this key already made, or None; a key reused with another body or route is a 409."""
    if not key:
        return None
    row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key))
    if row is None:
        return None
    if row.route != route or row.body_sha256 != body_hash(body):
        raise ApiError(409, "this Idempotency-Key was used with another request body")
    return row.resource_id


def remember(session: Session, owner: str, key: str | None, route: str, body: BaseModel, resource_id: str) -> None:
    if not key:
        return
    session.add(IdempotencyKey(owner=owner, key=key, route=route, body_sha256=body_hash(body), resource_id=resource_id))
    try:
        session.commit()
    except IntegrityError:  # the same key raced in; the first one stands
        session.rollback()
