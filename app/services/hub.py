"""Every ready model as a read-only Hugging Face-style repository `cbd/<model id>` with one revision, `main`; its
exports as a sibling repository per format: `cbd/<model id>-GGUF` (one file per quantization, `model-Q8_0.gguf`),
`cbd/<model id>-ONNX` (a folder per precision, `int4/model.onnx` and the rest), whose commit id moves as exports are
added while the model's own never does."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Artifact, Model
from app.schemas import HubLfs, HubModelInfo, HubRef, HubRefs, HubSibling, HubTreeEntry
from app.services.exports import ready_exports
from app.services.files import artifacts, commit_id
from cbd_engine.spec.export import EXPORT_FORMATS, repo_suffix

NAMESPACE = "cbd"
SIBLINGS = {f"-{repo_suffix(fmt)}": fmt for fmt in EXPORT_FORMATS}


def sibling_format(name: str) -> tuple[str, str | None]:
    """(model id, export format or None) of a repository name: a model id, or a model id and a sibling's suffix
    (`-GGUF`, `-ONNX`)."""
    for suffix, fmt in SIBLINGS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], fmt
    return name, None


def repo_files(session: Session, name: str) -> tuple[Model | None, str | None, list[Artifact]]:
    """(model, export format or None, files) of a repository name; a sibling holds the files of the model's ready
    exports of its format."""
    model_id, fmt = sibling_format(name)
    model = session.get(Model, model_id)
    if fmt is None:
        return model, None, artifacts(session, name) if model is not None else []
    exports = ready_exports(session, model.id, fmt) if model is not None else []
    rows = sorted((row for e in exports for row in artifacts(session, e.id)), key=lambda r: r.name)
    return (model if rows else None), fmt, rows


def repo(session: Session, name: str, revision: str = "main") -> tuple[Model, list[Artifact], str]:
    """The model, the repository's files and its commit id; 404 for an unknown repo or revision (as the Hub
    answers)."""
    model, _, rows = repo_files(session, name)
    if model is None or model.status != "ready":
        raise ApiError(404, f"repository {NAMESPACE}/{name} not found", headers={"X-Error-Code": "RepoNotFound"})
    sha = commit_id(rows)
    if revision not in ("main", sha):
        raise ApiError(404, f"revision {revision!r} not found; this repository has main ({sha})",
                       headers={"X-Error-Code": "RevisionNotFound"})
    return model, rows, sha


def model_info(name: str, model: Model, rows: list[Artifact], sha: str) -> HubModelInfo:
    repo_id = f"{NAMESPACE}/{name}"
    fmt = sibling_format(name)[1]
    tags = ["cbd", fmt] if fmt is not None else ["cbd", "safetensors", model.dtype]
    return HubModelInfo(id=repo_id, modelId=repo_id, sha=sha, tags=tags,
                        siblings=[HubSibling(rfilename=r.name, size=r.size) for r in rows],
                        createdAt=model.created_at, lastModified=model.created_at)


def tree(rows: list[Artifact]) -> list[HubTreeEntry]:
    return [HubTreeEntry(path=r.name, size=r.size, oid=r.sha256, lfs=HubLfs(oid=r.sha256, size=r.size)) for r in rows]


def refs(sha: str) -> HubRefs:
    """`GET /api/models/{repo}/refs`: the one branch, as llama.cpp's `-hf` asks before it lists the tree."""
    return HubRefs(branches=[HubRef(name="main", ref="refs/heads/main", targetCommit=sha)])
