"""One entry per export format: how the engine writes it and which runtime measures it, so the worker and the CLI
write, measure and publish every format through the same few lines.

- gguf: one file by the engine's own writer (gguf.py), run by llama.cpp (llamacpp.py).
- onnx: a folder by onnxruntime-genai's model builder (onnx.py), run by onnxruntime-genai (ortgenai.py).

Each runtime context manager yields an object whose `chat(message, max_tokens)` answers greedily through the
export's own tokenizer and chat template (the samples stored with an export).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cbd_engine.export.gguf import write_gguf
from cbd_engine.export.llamacpp import gguf_validation_loss, llama_cpp
from cbd_engine.export.onnx import write_onnx
from cbd_engine.export.ortgenai import onnx_validation_loss, ort_genai


@dataclass(frozen=True)
class ExportFormat:
    write: Callable[[Path, Path, str, str | None], Path]  # (model folder, out, quant, repo name) -> file or folder
    validation_loss: Callable[..., float]  # (export, tokenizer folder, instruction file, **options) -> loss
    runtime: Callable[[Path], AbstractContextManager]


def _write_gguf(folder: Path, out: Path, quant: str, name: str | None) -> Path:
    metadata = {"general.source.url": name} if name else None
    return write_gguf(folder, out, quant, name=name, metadata=metadata)


def _write_onnx(folder: Path, out: Path, quant: str, name: str | None) -> Path:
    return write_onnx(folder, out, quant)


FORMATS = {"gguf": ExportFormat(_write_gguf, gguf_validation_loss, llama_cpp),
           "onnx": ExportFormat(_write_onnx, onnx_validation_loss, ort_genai)}


def export_files(path: Path) -> list[tuple[str, Path]]:
    """(name in the sibling repository, file) of each file of a written export: the file itself, or every file of
    the folder as `<folder name>/<relative path>`."""
    if path.is_file():
        return [(path.name, path)]
    return [(f"{path.name}/{item.relative_to(path).as_posix()}", item) for item in sorted(path.rglob("*"))
            if item.is_file()]
