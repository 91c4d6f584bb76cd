from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from app.deps import LinkReader, Reader, SessionDep, StoreDep
from app.errors import ApiError, problem_responses
from app.services import chains, files, models

router = APIRouter(tags=["files"], responses=problem_responses(400, 401, 403, 404, 429))
FILE_RESPONSES = {200: {"description": "the file", "content": {"application/octet-stream": {}}},
                  206: {"description": "the requested range"}, 302: {"description": "a presigned store URL"},
                  304: {"description": "not modified"}}


def file_route(router: APIRouter, path: str) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """GET and HEAD on one path, with distinct OpenAPI operation ids."""

    def decorate(func: Callable[..., Response]) -> Callable[..., Response]:
        router.add_api_route(path, func, methods=["GET"], responses=FILE_RESPONSES, operation_id=func.__name__)
        router.add_api_route(path, func, methods=["HEAD"], responses=FILE_RESPONSES,
                             operation_id=f"{func.__name__}_head")
        return func

    return decorate


@file_route(router, "/models/{model_id}/files/{name}")
def model_file(model_id: str, name: str, request: Request, session: SessionDep, store: StoreDep,
               principal: LinkReader) -> Response:
    model = models.get_model(session, model_id)
    if model.status != "ready":
        raise ApiError(404, f"model {model.id} is {model.status}; its files appear when it is ready")
    return files.serve_file(request, store, files.find_file(session, model.id, name))


@file_route(router, "/chains/{chain_id}/anchors/{index}/files/{name}")
def anchor_file(chain_id: str, index: Annotated[int, Path(ge=0, le=1000)], name: str, request: Request,
                session: SessionDep, store: StoreDep, principal: Reader) -> Response:
    anchor = chains.get_anchor(session, chain_id, index)
    return files.serve_file(request, store, files.find_file(session, anchor.id, name))
