"""The files of models and anchors: listing (from the artifacts table, never from a request path) and serving."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable, StreamingResponse

from app.errors import ApiError
from app.models import Artifact, Export
from app.schemas import FileOut
from app.storage import ArtifactStore, StoredFile


class FastFileResponse(FileResponse):
    chunk_size = 4 << 20  # 64 KiB reads cap a loopback download near 1 GB/s; 4 MiB leaves it to the socket

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        """Starlette's parsing, with its plain-text 400 and empty 416 as problems like every other error (raised
        while the response starts, inside the app's exception handlers)."""
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as error:
            raise ApiError(400, f"malformed Range header: {error.content}") from None
        except RangeNotSatisfiable as error:
            raise ApiError(416, f"the Range is outside the file's {error.max_size} bytes",
                           headers={"Content-Range": f"bytes */{error.max_size}"}) from None


def artifacts(session: Session, owner_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.owner_id == owner_id).order_by(Artifact.name)))


def files_out(rows: list[Artifact], base_url: str) -> list[FileOut]:
    return [FileOut(name=a.name, size=a.size, sha256=a.sha256, url=f"{base_url}/{a.name}") for a in rows]


def record_files(session: Session, owner_id: str, files: list[StoredFile]) -> None:
    for item in files:
        session.add(Artifact(owner_id=owner_id, name=item.name, size=item.size, sha256=item.sha256))


def remove_artifacts(session: Session, owner_ids: list[str]) -> set[str]:
    """Delete the artifact rows of these models or anchors (uncommitted); the sha256 of the blobs they named, for
    `collect_blobs` once that is committed."""
    blobs = set(session.scalars(select(Artifact.sha256).where(Artifact.owner_id.in_(owner_ids))))
    session.execute(delete(Artifact).where(Artifact.owner_id.in_(owner_ids)))
    return blobs


def remove_exports(session: Session, model_ids: list[str]) -> set[str]:
    """Delete these models' exports with their artifact rows (uncommitted); the blobs they named, as above."""
    export_ids = list(session.scalars(select(Export.id).where(Export.model_id.in_(model_ids))))
    blobs = remove_artifacts(session, export_ids)
    session.execute(delete(Export).where(Export.id.in_(export_ids)))
    return blobs


def collect_blobs(session: Session, store: ArtifactStore, blobs: Iterable[str], grace_seconds: float) -> None:
    """Mark and sweep, the only way blobs leave the store: of these blobs, remove those that no artifact row names
    and that no publish wrote within the grace period. The store is content-addressed, so a worker may be
    publishing a deleted model's blob for another model: it writes (or touches) the blob before it records its
    rows, within the grace period, and `collect` tests the age and removes in one step, so that blob stays."""
    for sha256 in blobs:
        if session.scalar(select(Artifact.id).where(Artifact.sha256 == sha256).limit(1)) is None:
            store.collect(sha256, grace_seconds)


def find_file(session: Session, owner_id: str, name: str) -> Artifact:
    """The artifact of that exact name, or 404: the name is looked up, never joined to a path."""
    row = session.scalar(select(Artifact).where(Artifact.owner_id == owner_id, Artifact.name == name))
    if row is None:
        raise ApiError(404, f"no file named {name!r} here")
    return row


def commit_id(rows: list[Artifact]) -> str:
    """The one revision's 40-hex commit id, derived from the files' names and sha256."""
    digest = hashlib.sha1(usedforsecurity=False)
    for row in sorted(rows, key=lambda r: r.name):
        digest.update(f"{row.name}\0{row.sha256}\n".encode())
    return digest.hexdigest()


def serve_file(request: Request, store: ArtifactStore, row: Artifact, extra: dict[str, str] | None = None) -> Response:
    """HEAD/GET with the sha256 ETag, Hub headers, Range -> 206, If-None-Match -> 304, S3 -> 302 presigned."""
    etag = f'"{row.sha256}"'
    # a file fetched with a token is for that token's holder: no shared cache may keep it for others
    cache = "private" if request.app.state.settings.auth_enabled else "public"
    headers = {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(row.size), "Accept-Ranges": "bytes",
               "Cache-Control": f"{cache}, max-age=31536000, immutable", **(extra or {})}
    matches = [tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")]
    if etag in matches or "*" in matches:
        return Response(status_code=304, headers=headers)
    disposition = f'attachment; filename="{row.name}"'
    if request.method == "HEAD":
        return Response(headers={**headers, "Content-Length": str(row.size), "Content-Disposition": disposition,
                                 "Content-Type": media_type(row.name)})
    redirect = store.presigned_url(row.sha256, row.name)
    if redirect:
        return RedirectResponse(redirect, status_code=302, headers=headers)
    path = store.local_path(row.sha256)
    if path is None:
        return StreamingResponse(store.open(row.sha256), media_type=media_type(row.name),
                                 headers={**headers, "Content-Length": str(row.size)})
    return FastFileResponse(path, media_type=media_type(row.name), headers={**headers,
                            "Content-Disposition": disposition})


def media_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"
