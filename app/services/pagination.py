"""Keyset pagination over time-ordered ids: `?limit=&page_token=` -> `{items, next_page_token}`."""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import ApiError

T = TypeVar("T")


def encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not value or len(value) > 40 or not value.replace("_", "").isalnum():
        raise ApiError(422, "page_token: not a token returned by this list", errors=[
            {"field": "page_token", "message": "not a token returned by this list"}])
    return value


def where_given(query: Select[Any], *filters: tuple[Any, str | None]) -> Select[Any]:
    """The list filters: `column == value` for every (column, value) whose value was given."""
    for column, value in filters:
        if value:
            query = query.where(column == value)
    return query


def paginate(session: Session, query: Select[Any], id_column: Any, limit: int, page_token: str | None) -> tuple[
        list[Any], str | None]:
    """Rows newest first, at most `limit`, and the token of the next page (None on the last)."""
    if page_token:
        query = query.where(id_column < decode_token(page_token))
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    if len(rows) > limit:
        return rows[:limit], encode_token(rows[limit - 1].id)
    return rows, None
