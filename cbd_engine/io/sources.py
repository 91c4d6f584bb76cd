"""The one source resolver: whatever a request's `source` names (spec/sources.py) as a local model folder."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from cbd_engine.io import gguf
from cbd_engine.io.checkpoint import file_info
from cbd_engine.io.zoo import fetch_zoo
from cbd_engine.spec.families import read_config
from cbd_engine.spec.sources import zoo_entry

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # weights, config and tokenizer files


@dataclass(frozen=True)
class HubAccess:
    """How Hub ids are fetched: `token` as huggingface_hub takes it (None: the process's own login, False: none),
    another `endpoint` (a mirror), and a cap on the bytes a source may download (checked before it does)."""

    token: str | bool | None = None
    endpoint: str | None = None
    max_bytes: int | None = None


def resolve_source(source: str, cache: Path, hub: HubAccess = HubAccess()) -> Path:
    """A local model folder as it is; a zoo model ("zoo:<name>" or its Hub id) fetched offline; a .gguf file
    converted once into `cache`/gguf/<its sha256> (keyed by content: two files named model.gguf are two models);
    another Hugging Face id downloaded into the Hub's own cache (weights as safetensors and tokenizer files), as
    `hub` allows."""
    zoo = zoo_entry(source)
    if zoo is not None:
        return fetch_zoo(zoo)
    path = Path(source)
    if path.is_dir():
        read_config(path)
        return path
    if path.suffix == ".gguf" and path.is_file():
        target = Path(cache) / "gguf" / file_info(path).sha256
        if not (target / "config.json").is_file():
            gguf.import_gguf(path, target)  # through the module: tests replace the conversion
        return target
    if path.exists() or source.startswith(("/", ".")):
        raise FileNotFoundError(f"source {source} is neither a model folder, a .gguf file nor a Hugging Face id")
    return hub_snapshot(source, hub)


def hub_snapshot(repo_id: str, hub: HubAccess) -> Path:
    """The repository's HUB_FILES, at the revision whose size was checked against `hub.max_bytes`."""
    from huggingface_hub import HfApi, snapshot_download  # only this path needs the Hub client

    info = HfApi(endpoint=hub.endpoint).model_info(repo_id, files_metadata=True, token=hub.token)
    size = sum(s.size or 0 for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in HUB_FILES))
    if hub.max_bytes is not None and size > hub.max_bytes:
        raise ValueError(f"source {repo_id} has {size} bytes of weights and side files, more than the "
                         f"{hub.max_bytes} allowed (CBD_MAX_SOURCE_BYTES)")
    return Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=HUB_FILES, token=hub.token,
                                  endpoint=hub.endpoint))
