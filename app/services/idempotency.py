"""Idempotency-Key on POST: the same key with the same body returns the same resource; another body is a 409.

The key is claimed before the resource is created (a row without a resource id, unique per owner and key), so two
identical requests racing in create one resource: the loser gets the winner's resource when it is there, else a 409
asking it to retry. A claim whose request failed is released; one left by a process that died is taken over after
ABANDONED_AFTER.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta, timezone
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import IdempotencyKey, utcnow

ABANDONED_AFTER = timedelta(minutes=2)  # creating a resource is a few database writes and an enqueue
Created = TypeVar("Created")


def body_hash(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_once(session: Session, owner: str, key: str | None, route: str, body: BaseModel,
                create: Callable[[], Created], resource_id: Callable[[Created], str],
                ) -> tuple[str | None, Created | None]:
    """`create` run at most once per Idempotency-Key: (the id of the resource an earlier identical request made,
    None), or (None, what `create` returned) with the key claimed first, released if `create` fails, and pointed at
    the new resource after it."""
    known = claim(session, owner, key, route, body)
    if known is not None:
        return known, None
    with _releasing_on_error(session, owner, key):
        created = create()
    _complete(session, owner, key, resource_id(created))
    return None, created


def claim(session: Session, owner: str, key: str | None, route: str, body: BaseModel) -> str | None:
    """Reserve `key` for this request before it creates anything. None: this request holds the key now (or sent
    none) and must `_complete` it; otherwise the id of the resource an earlier identical request made. A key used
    with another body or route, or held by a request still in flight, is a 409."""
    if not key:
        return None
    digest = body_hash(body)
    session.add(IdempotencyKey(owner=owner, key=key, route=route, body_sha256=digest, resource_id=None))
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
    row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key))
    if row is None:  # released between our insert and this read: the client may simply retry
        raise ApiError(409, "a request with this Idempotency-Key just failed; retry it")
    if row.route != route or row.body_sha256 != digest:
        raise ApiError(409, "this Idempotency-Key was used with another request body")
    if row.resource_id is not None:
        return row.resource_id
    if _take_over(session, row):
        return None
    raise ApiError(409, "a request with this Idempotency-Key is still in progress; retry it when that one has answered")


def _take_over(session: Session, row: IdempotencyKey) -> bool:
    """Whether this request now holds a claim abandoned by a process that died before completing it."""
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)  # SQLite
    if utcnow() - created < ABANDONED_AFTER:
        return False
    taken = session.execute(update(IdempotencyKey).where(
        IdempotencyKey.id == row.id, IdempotencyKey.resource_id.is_(None),
        IdempotencyKey.created_at == row.created_at).values(created_at=utcnow()))
    session.commit()
    return taken.rowcount == 1


@contextlib.contextmanager
def _releasing_on_error(session: Session, owner: str, key: str | None) -> Iterator[None]:
    """Around the creation of a claimed key's resource: if it fails (a 4xx included), the claim is released so that
    the client can retry with the same key."""
    try:
        yield
    except BaseException:
        session.rollback()
        if key:
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key,
                                                         IdempotencyKey.resource_id.is_(None)))
            session.commit()
        raise


def _complete(session: Session, owner: str, key: str | None, resource_id: str) -> None:
    """Record the resource a claimed key made; later requests with the key get it."""
    if not key:
        return
    session.execute(update(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key)
                    .values(resource_id=resource_id))
    session.commit()
