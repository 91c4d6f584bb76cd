"""Request-scoped dependencies besides the database session and auth."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request
from sqlalchemy.orm import Session

from app.auth import Principal, reader_or_link, require
from app.db import get_session
from app.settings import Settings
from app.storage import ArtifactStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
Reader = Annotated[Principal, Depends(require("read"))]
LinkReader = Annotated[Principal, Depends(reader_or_link)]  # a read token or a signed link
Builder = Annotated[Principal, Depends(require("build"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Limit = Annotated[int, Query(ge=1, le=500, description="items per page")]
PageToken = Annotated[str | None, Query(max_length=100, description="next_page_token of the previous page")]
IdempotencyKeyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
