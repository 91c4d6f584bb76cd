"""Content-addressed artifact stores: every file is kept under its sha256, written to a temporary key and published
atomically. Local filesystem (`file://`) and S3-compatible (`s3://bucket/prefix`) backends.

Only safetensors weights and JSON/text side files are stored; nothing stored or served is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
# side files a model folder may carry besides its weights; pickled formats (*.bin, *.pt, *.pth, *.pkl) never are
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".md")
ALLOWED_NAMES = ("loss_curve.csv",)  # a distilled anchor's curve (cbd_engine.distill), which the console draws


class ArtifactError(ValueError):
    """A file that may not be stored (a pickle, a malformed safetensors header, a bad name)."""


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def validate_safetensors(path: Path) -> None:
    """Check a safetensors header without loading tensors: JSON, known dtypes, offsets that tile the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ArtifactError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path.name}: safetensors header length {header_len} exceeds the file")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{path.name}: safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}: safetensors header is not an object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ArtifactError(f"{path.name}: tensor {name!r} has no known dtype")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ArtifactError(f"{path.name}: tensor {name!r} has malformed data_offsets")
        spans.append(tuple(offsets))
    position = 0
    for begin, end in sorted(spans):
        if begin != position or end < begin:
            raise ArtifactError(f"{path.name}: tensor data offsets overlap or leave gaps")
        position = end
    if 8 + header_len + position != size:
        raise ArtifactError(f"{path.name}: tensor data ({position} bytes) does not fill the file")


def resolved_within(path: Path, roots: Sequence[Path]) -> Path | None:
    """`path` with every symlink resolved, when that lies inside one of `roots` (resolved folders); else None. The
    one test of "may the server read this": a link inside an allowed folder may point anywhere."""
    real = path.resolve()
    return real if any(real.is_relative_to(root) for root in roots) else None


def model_files(folder: Path, roots: Sequence[Path]) -> list[Path]:
    """The files of a model folder that are published: weights (validated) and side files; pickles are refused, and
    so are links that resolve outside `roots` (`is_file()` follows links: a link to /proc/self/environ is a file)."""
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if resolved_within(path, roots) is None:
            raise ArtifactError(f"{path.name}: a link to a file outside the server's allowed roots")
        if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"):
            raise ArtifactError(f"{path.name}: pickled weights are not accepted; use safetensors")
        if path.suffix not in ALLOWED_SUFFIXES and path.name not in ALLOWED_NAMES:
            continue
        if path.suffix == ".safetensors":
            validate_safetensors(path)
        files.append(path)
    if not any(p.suffix == ".safetensors" for p in files):
        raise ArtifactError(f"{folder} has no *.safetensors weights")
    return files


class ArtifactStore(Protocol):
    def put_file(self, path: Path, sha256: str | None = None, move: bool = False) -> StoredFile: ...

    def exists(self, sha256: str) -> bool: ...

    def local_path(self, sha256: str) -> Path | None: ...

    def presigned_url(self, sha256: str, filename: str) -> str | None: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def collect(self, sha256: str, grace_seconds: float) -> None: ...

    def blob_ids(self) -> Iterator[str]: ...

    def check(self) -> None: ...

    def fetch_to(self, sha256: str, dest: Path) -> None: ...


def put_folder(store: ArtifactStore, folder: Path, roots: Sequence[Path],
               known: dict[str, str] | None = None) -> list[StoredFile]:
    """Publish a model folder whose files resolve inside `roots`. `known` (name -> sha256, from the engine that just
    wrote the folder) lets a local store move the files into place; anything else is hashed as it is copied."""
    known = known or {}
    return [store.put_file(p, known.get(p.name), move=p.name in known) for p in model_files(folder, roots)]


def link_folder(store: ArtifactStore, files: list[StoredFile], dest: Path) -> Path:
    """A model folder at `dest` with the given files (hard links into a local store, or downloads), made atomically,
    each file's sha256 checked as it arrives."""
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for item in files:
            store.fetch_to(item.sha256, tmp / item.name)
            if sha256_file(tmp / item.name) != item.sha256:  # a worker never builds on a damaged blob
                raise ArtifactError(f"{item.name}: the stored blob {item.sha256} no longer has that sha256 (damaged "
                                    "storage); restore it from a backup or rebuild what it belongs to")
        try:
            tmp.rename(dest)
        except OSError:  # another worker made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class LocalStore:
    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _blob(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}")
        return self.root / "blobs" / sha256[:2] / sha256

    def put_file(self, path: Path, sha256: str | None = None, move: bool = False) -> StoredFile:
        """Copy (hashing on the way) and publish; `move` with a known sha256 publishes a worker's own output by
        renaming it into place, without reading it again."""
        if move and sha256 is not None:
            size = path.stat().st_size
            os.utime(path)  # a publish makes its blob young: `collect` spares it until its rows are recorded
            with open(path, "rb") as written:  # the engine's output, maybe still in the page cache only
                os.fsync(written.fileno())
            self._publish(path, sha256)
            return StoredFile(path.name, size, sha256)
        tmp = self.root / "tmp" / uuid.uuid4().hex
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and sha256 != actual:
            tmp.unlink()
            raise ArtifactError(f"{path.name}: sha256 {actual} does not match the expected {sha256}")
        self._publish(tmp, actual)
        return StoredFile(path.name, size, actual)

    def _publish(self, written: Path, sha256: str) -> None:
        """Rename a file whose bytes are on the disk into place, and make the rename durable too: a crash never
        leaves a blob that is named but empty or short. The same content under the same key is harmless to
        replace."""
        blob = self._blob(sha256)
        blob.parent.mkdir(exist_ok=True)
        os.replace(written, blob)
        folder = os.open(blob.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def exists(self, sha256: str) -> bool:
        return self._blob(sha256).is_file()

    def local_path(self, sha256: str) -> Path | None:
        blob = self._blob(sha256)
        return blob if blob.is_file() else None

    def presigned_url(self, sha256: str, filename: str) -> str | None:
        return None

    def open(self, sha256: str) -> BinaryIO:
        return open(self._blob(sha256), "rb")

    def collect(self, sha256: str, grace_seconds: float) -> None:
        """Remove the blob unless a publish wrote it within the grace period. Moved aside first, so that the age
        test and the removal are one step: a publish that lands after the move writes a new blob, one that landed
        before it made the moved blob young, and that is put back."""
        doomed = self.root / "tmp" / f"collect-{uuid.uuid4().hex}"
        try:
            os.replace(self._blob(sha256), doomed)
        except FileNotFoundError:
            return
        if time.time() - doomed.stat().st_mtime < grace_seconds:
            os.replace(doomed, self._blob(sha256))  # the same content as any blob published there meanwhile
        else:
            doomed.unlink()

    def blob_ids(self) -> Iterator[str]:
        return (path.name for path in (self.root / "blobs").glob("*/*") if SHA256_RE.match(path.name))

    def check(self) -> None:
        probe = self.root / "tmp" / f"ready-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()

    def fetch_to(self, sha256: str, dest: Path) -> None:
        try:
            os.link(self._blob(sha256), dest)
        except OSError:
            shutil.copyfile(self._blob(sha256), dest)


class S3Store:
    """An S3-compatible bucket: blobs under `<prefix>/blobs/<sha256>`, uploads to `<prefix>/tmp/` then copied."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        config = Config(signature_version="s3v4", s3={"addressing_style": "path" if endpoint_url else "auto"})
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _blob(self, sha256: str) -> str:
        if not SHA256_RE.match(sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}")
        return self._key("blobs", sha256)

    def put_file(self, path: Path, sha256: str | None = None, move: bool = False) -> StoredFile:
        """A lease first (`collect` spares or restores a blob with a young lease), then the blob unless it exists."""
        actual = sha256 if move and sha256 else sha256_file(path)
        if sha256 is not None and sha256 != actual:
            raise ArtifactError(f"{path.name}: sha256 {actual} does not match the expected {sha256}")
        size = path.stat().st_size
        self.client.put_object(Bucket=self.bucket, Key=self._key("leases", actual, uuid.uuid4().hex), Body=b"")
        if not self.exists(actual):
            tmp = self._key("tmp", uuid.uuid4().hex)
            self.client.upload_file(str(path), self.bucket, tmp)
            self._copy(tmp, self._blob(actual))
            self.client.delete_object(Bucket=self.bucket, Key=tmp)
        return StoredFile(path.name, size, actual)

    def _copy(self, source: str, dest: str) -> None:
        self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, dest)

    def _leases(self, sha256: str) -> list[tuple[str, float]]:
        """(key, age in seconds) of the blob's leases."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._key("leases", sha256) + "/")
        now = time.time()
        return [(item["Key"], now - item["LastModified"].timestamp()) for page in pages
                for item in page.get("Contents", [])]

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._blob(sha256))
            return True
        except ClientError:
            return False

    def local_path(self, sha256: str) -> Path | None:
        return None

    def presigned_url(self, sha256: str, filename: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._blob(sha256),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=3600,
        )

    def open(self, sha256: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self._blob(sha256))["Body"]

    def collect(self, sha256: str, grace_seconds: float) -> None:
        """Remove the blob unless a publish leased it within the grace period. S3 has no atomic test-and-delete, so
        the blob is set aside, deleted, and put back if a lease appeared meanwhile: a publish whose lease lands
        after that second look finds no blob and uploads its own."""
        if any(age < grace_seconds for _, age in self._leases(sha256)) or not self.exists(sha256):
            return
        aside = self._key("tmp", f"collect-{uuid.uuid4().hex}")
        self._copy(self._blob(sha256), aside)
        self.client.delete_object(Bucket=self.bucket, Key=self._blob(sha256))
        leases = self._leases(sha256)
        if any(age < grace_seconds for _, age in leases):
            self._copy(aside, self._blob(sha256))
        else:
            for key, _ in leases:
                self.client.delete_object(Bucket=self.bucket, Key=key)
        self.client.delete_object(Bucket=self.bucket, Key=aside)

    def blob_ids(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key("blobs/"))
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if SHA256_RE.match(name):
                    yield name

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def fetch_to(self, sha256: str, dest: Path) -> None:
        self.client.download_file(self.bucket, self._blob(sha256), str(dest))


def open_store(url: str, s3_endpoint_url: str = "") -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, s3_endpoint_url)
    raise ValueError(f"CBD_STORAGE_URL must be file://... or s3://bucket/prefix, got {url!r}")
