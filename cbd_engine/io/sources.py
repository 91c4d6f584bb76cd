"""The one source resolver: whatever a request's `source` names (spec/sources.py) as a local model folder."""

from __future__ import annotations

from pathlib import Path

from cbd_engine.io import gguf
from cbd_engine.io.checkpoint import file_info
from cbd_engine.io.zoo import fetch_zoo
from cbd_engine.spec.families import read_config
from cbd_engine.spec.sources import zoo_entry

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # weights, config and tokenizer files


def resolve_source(source: str, cache: Path) -> Path:
    """A local model folder as it is; a zoo model ("zoo:<name>" or its Hub id) fetched offline; a .gguf file
    converted once into `cache`/gguf/<its sha256> (keyed by content: two files named model.gguf are two models);
    another Hugging Face id downloaded into the Hub's own cache (weights as safetensors and tokenizer files)."""
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
    from huggingface_hub import snapshot_download  # only this path needs the Hub client

    return Path(snapshot_download(source, allow_patterns=HUB_FILES))
