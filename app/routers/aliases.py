"""Aliases (names deployments use for a model, also Hub repositories `cbd/<alias>`) and tags of models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.deps import Builder, Reader, SessionDep, SettingsDep
from app.errors import problem_responses
from app.schemas import AliasOut
from app.services import aliases

router = APIRouter(tags=["aliases"], responses=problem_responses(400, 401, 403, 404, 429))


@router.put("/models/{model_id}/aliases/{name}", response_model=AliasOut,
            responses={201: {"model": AliasOut, "description": "the alias was made"}, **problem_responses(409, 422)})
def set_alias(model_id: str, name: str, session: SessionDep, settings: SettingsDep, principal: Builder,
              response: Response) -> AliasOut:
    """Point the alias at this ready model, moving it from the model it pointed at (`previous`)."""
    alias, created = aliases.set_alias(session, settings, model_id, name, principal.name)
    response.status_code = 201 if created else 200
    return alias


@router.delete("/models/{model_id}/aliases/{name}", status_code=204, responses=problem_responses(409))
def delete_model_alias(model_id: str, name: str, session: SessionDep, settings: SettingsDep,
                       principal: Builder) -> Response:
    """Remove the alias if it points at this model (404 otherwise)."""
    aliases.delete_alias(session, settings, name, model_id)
    return Response(status_code=204)


@router.get("/aliases", response_model=list[AliasOut], responses=problem_responses(422))
def list_aliases(session: SessionDep, principal: Reader,
                 model: Annotated[str | None, Query(max_length=40, pattern=r"^mdl_\w+$",
                                                    description="the aliases of this model")] = None) -> list[AliasOut]:
    """Every alias by name, or those of one model."""
    return aliases.list_aliases(session, model)


@router.get("/aliases/{name}", response_model=AliasOut)
def get_alias(name: str, session: SessionDep, principal: Reader) -> AliasOut:
    return aliases.alias_out(aliases.get_alias(session, name))


@router.delete("/aliases/{name}", status_code=204, responses=problem_responses(409))
def delete_alias(name: str, session: SessionDep, settings: SettingsDep, principal: Builder) -> Response:
    aliases.delete_alias(session, settings, name)
    return Response(status_code=204)


@router.put("/models/{model_id}/tags/{tag}", status_code=204, responses=problem_responses(422))
def add_tag(model_id: str, tag: str, session: SessionDep, principal: Builder) -> Response:
    aliases.add_tag(session, model_id, tag)
    return Response(status_code=204)


@router.delete("/models/{model_id}/tags/{tag}", status_code=204)
def remove_tag(model_id: str, tag: str, session: SessionDep, principal: Builder) -> Response:
    aliases.remove_tag(session, model_id, tag)
    return Response(status_code=204)
