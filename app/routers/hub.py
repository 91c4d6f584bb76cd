"""The routes current huggingface_hub uses, so snapshot_download(repo_id="cbd/<id>", endpoint=...) works unchanged,
and those llama.cpp's `-hf` download uses (refs, then the tree at the commit, then HEAD and GET on resolve), so
`MODEL_ENDPOINT=http://host:port/ llama-cli -hf cbd/<id>-GGUF:Q8_0` pulls an export. `{model_id}` is a repository
name: a model id or an alias, or either with a sibling's suffix (`-GGUF`)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from app.deps import Reader, SessionDep, StoreDep
from app.errors import ApiError, problem_responses
from app.routers.files import file_route
from app.schemas import HubModelInfo, HubRefs, HubTreeEntry
from app.services import files, hub

router = APIRouter(tags=["hub"], responses=problem_responses(400, 401, 403, 404, 429))


@router.get("/api/models/cbd/{model_id}", response_model=HubModelInfo)
def repo_info(model_id: str, session: SessionDep, principal: Reader) -> HubModelInfo:
    return hub.model_info(model_id, *hub.repo(session, model_id))


@router.get("/api/models/cbd/{model_id}/refs", response_model=HubRefs)
def repo_refs(model_id: str, session: SessionDep, principal: Reader) -> HubRefs:
    _, _, sha = hub.repo(session, model_id)
    return hub.refs(sha)


@router.get("/api/models/cbd/{model_id}/revision/{revision}", response_model=HubModelInfo)
def repo_revision(model_id: str, revision: str, session: SessionDep, principal: Reader) -> HubModelInfo:
    return hub.model_info(model_id, *hub.repo(session, model_id, revision))


@router.get("/api/models/cbd/{model_id}/tree/{revision}", response_model=list[HubTreeEntry])
def repo_tree(model_id: str, revision: str, session: SessionDep, principal: Reader, response: Response,
              recursive: bool = False, limit: int = Query(default=1000, ge=1, le=1000),
              cursor: int = Query(default=0, ge=0, le=10**6)) -> list[HubTreeEntry]:
    _, rows, _ = hub.repo(session, model_id, revision)
    entries = hub.tree(rows)
    if cursor + limit < len(entries):
        response.headers["Link"] = (f'</api/models/cbd/{model_id}/tree/{revision}?recursive={str(recursive).lower()}'
                                    f'&limit={limit}&cursor={cursor + limit}>; rel="next"')
    return entries[cursor : cursor + limit]


@file_route(router, "/cbd/{model_id}/resolve/{revision}/{filename:path}")
def resolve(model_id: str, revision: str, filename: str, request: Request, session: SessionDep, store: StoreDep,
            principal: Reader) -> Response:
    _, rows, sha = hub.repo(session, model_id, revision)
    row = next((r for r in rows if r.name == filename), None)
    if row is None:
        raise ApiError(404, f"no file named {filename!r} here", headers={"X-Error-Code": "EntryNotFound"})
    return files.serve_file(request, store, row, {"X-Repo-Commit": sha})
