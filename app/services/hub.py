"""Every ready model as a read-only Hugging Face-style repository `cbd/<model id>` with one revision, `main`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Artifact, Model
from app.schemas import HubLfs, HubModelInfo, HubSibling, HubTreeEntry
from app.services.files import artifacts, commit_id

NAMESPACE = "cbd"


def repo(session: Session, model_id: str, revision: str = "main") -> tuple[Model, list[Artifact], str]:
    """The model, its files and its commit id; 404 for an unknown repo or revision (as the Hub answers)."""
    model = session.get(Model, model_id)
    if model is None or model.status != "ready":
        raise ApiError(404, f"repository {NAMESPACE}/{model_id} not found", headers={"X-Error-Code": "RepoNotFound"})
    rows = artifacts(session, model.id)
    sha = commit_id(rows)
    if revision not in ("main", sha):
        raise ApiError(404, f"revision {revision!r} not found; this repository has main ({sha})",
                       headers={"X-Error-Code": "RevisionNotFound"})
    return model, rows, sha


def model_info(model: Model, rows: list[Artifact], sha: str) -> HubModelInfo:
    repo_id = f"{NAMESPACE}/{model.id}"
    return HubModelInfo(id=repo_id, modelId=repo_id, sha=sha, tags=["cbd", "safetensors", model.dtype],
                        siblings=[HubSibling(rfilename=r.name, size=r.size) for r in rows],
                        createdAt=model.created_at, lastModified=model.created_at)


def tree(rows: list[Artifact]) -> list[HubTreeEntry]:
    return [HubTreeEntry(path=r.name, size=r.size, oid=r.sha256, lfs=HubLfs(oid=r.sha256, size=r.size)) for r in rows]
