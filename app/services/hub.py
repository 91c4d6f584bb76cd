"""Every ready model as a read-only Hugging Face-style repository `cbd/<model id>` with one revision, `main`; its
exports as a sibling repository per format: `cbd/<model id>-GGUF` (one file per quantization, `model-Q8_0.gguf`),
`cbd/<model id>-ONNX` (a folder per precision, `int4/model.onnx` and the rest), whose commit id moves as exports are
added while the model's own never does. An alias is a repository name too: `cbd/<alias>` (and `cbd/<alias>-GGUF`,
`-ONNX`) serves the files and the commit id of the model it points at now, so a client's cache (keyed by commit id)
holds each target's files apart and a move is a new revision of the repo."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Alias, Artifact, Model
from app.schemas import HubLfs, HubModelInfo, HubRef, HubRefs, HubSibling, HubTreeEntry
from app.services.exports import ready_exports
from app.services.files import artifacts, commit_id
from cbd_engine.spec.export import EXPORT_FORMATS, repo_suffix

NAMESPACE = "cbd"
SIBLINGS = {f"-{repo_suffix(fmt)}": fmt for fmt in EXPORT_FORMATS}


def split_sibling(name: str) -> tuple[str, str | None]:
    """(the model's repository name, the export format) of a sibling's name (`<name>-GGUF`, `<name>-ONNX`);
    (name, None) else."""
    for suffix, fmt in SIBLINGS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], fmt
    return name, None


def named_model(session: Session, name: str) -> Model | None:
    """The model of a repository name: a model id, or an alias (which never looks like a model id)."""
    return session.get(Model, name) or session.scalar(
        select(Model).join(Alias, Alias.model_id == Model.id).where(Alias.name == name))


def repo_files(session: Session, name: str) -> tuple[Model | None, str | None, list[Artifact]]:
    """(model, export format or None, files) of a repository name: a model id or an alias, or either with a
    sibling's suffix (`-GGUF`, `-ONNX`); a sibling holds the files of the model's ready exports of that format."""
    base, fmt = split_sibling(name)
    model = named_model(session, base)
    if model is None:
        return None, fmt, []
    if fmt is None:
        return model, None, artifacts(session, model.id)
    exports = ready_exports(session, model.id, fmt)
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
    fmt = split_sibling(name)[1]
    tags = ["cbd", fmt] if fmt is not None else ["cbd", "safetensors", model.dtype]
    return HubModelInfo(id=repo_id, modelId=repo_id, sha=sha, tags=tags,
                        siblings=[HubSibling(rfilename=r.name, size=r.size) for r in rows],
                        createdAt=model.created_at, lastModified=model.created_at)


def tree(rows: list[Artifact]) -> list[HubTreeEntry]:
    return [HubTreeEntry(path=r.name, size=r.size, oid=r.sha256, lfs=HubLfs(oid=r.sha256, size=r.size)) for r in rows]


def refs(sha: str) -> HubRefs:
    """`GET /api/models/{repo}/refs`: the one branch, as llama.cpp's `-hf` asks before it lists the tree."""
    return HubRefs(branches=[HubRef(name="main", ref="refs/heads/main", targetCommit=sha)])
