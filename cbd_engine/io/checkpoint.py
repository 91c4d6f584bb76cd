"""Hugging Face checkpoint folders: streaming safetensors I/O, side files, cached hashes (atomic output: atomic.py).

The safetensors package reads through mmap (touched pages stay resident) and writes whole dicts only; the
materializer needs one tensor in memory at a time on both sides, so this module reads with pread and writes a
planned layout tensor by tensor. The format itself is what safetensors specifies: an 8-byte little-endian header
length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from cbd_engine.io.atomic import write_text_atomically
from cbd_engine.spec import options

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
assert set(DTYPE_NAMES.values()) == set(options.DTYPES), "spec/options.py DTYPES names these dtypes"
SAFETENSORS_CODES = {v: k for k, v in DTYPES.items()}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
HASH_CACHE = ".cbd-sha256.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
_CHUNK = 16 * 2**20


def parse_dtype(name: str) -> torch.dtype:
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    if name not in by_name:
        raise ValueError(f"dtype must be one of {sorted(by_name)}, got {name!r}")
    return by_name[name]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (truncated header)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20 or length > path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    return header, 8 + length


class SafetensorsReader:
    """All tensors of a folder (single file or sharded with an index), read one at a time with pread."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no *.safetensors weights")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            header, base = _read_header(path)
            size = path.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                if base + end > size:
                    raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
                self.tensors[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
        self._fds: dict[Path, int] = {}

    def resolve(self, name: str) -> str:
        """The stored name; GPT-2 checkpoints may lack the base-model prefix (`h.0...` for `transformer.h.0...`)."""
        if name in self.tensors:
            return name
        short = name.split(".", 1)[1] if "." in name else name
        if short in self.tensors:
            return short
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except KeyError:
            return False
        return True

    def info(self, name: str) -> TensorInfo:
        return self.tensors[self.resolve(name)]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or rows [start, stop) of its first dimension, read with pread (no mmap, nothing kept)."""
        info = self.info(name)
        if info.dtype not in DTYPES:
            raise ValueError(f"tensor {name} has dtype {info.dtype}; supported: {sorted(DTYPES)}")
        shape, start, end = info.shape, info.start, info.end
        if rows is not None:
            row_bytes = (end - start) // shape[0] if shape and shape[0] else 0
            shape = (rows[1] - rows[0], *shape[1:])
            start, end = info.start + rows[0] * row_bytes, info.start + rows[1] * row_bytes
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buffer = bytearray(end - start)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise ValueError(f"{info.file} is truncated at tensor {name}")
            done += got
        if not buffer:
            return torch.empty(shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    sha256: str


class StreamingWriter:
    """Writes a planned list of tensors into `model.safetensors` (or shards plus an index), one tensor at a time,
    hashing every byte as it goes. Tensors must be written in the planned order with the planned shapes."""

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.dtype = folder, dtype
        item = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, shape in plan:
            nbytes = item * _numel(shape)
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, shape, nbytes))
            used += nbytes
        count = len(shards)
        self._names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._shards = shards
        self._order = [(name, shape) for shard in shards for name, shape, _ in shard]
        self._position = 0
        self._shard = -1
        self._handle = None
        self._hash = hashlib.sha256()
        self._remaining = 0
        self.files: list[FileInfo] = []

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        offset, header = 0, {"__metadata__": {"format": "pt"}}
        for name, shape, nbytes in self._shards[self._shard]:
            header[name] = {"dtype": SAFETENSORS_CODES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
        self._handle = open(self.folder / self._names[self._shard], "wb")
        self._hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._remaining = len(self._shards[self._shard])

    def _emit(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._handle.write(data)

    def _close_current(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        path = self.folder / self._names[self._shard]
        self.files.append(FileInfo(path.name, path.stat().st_size, self._hash.hexdigest()))
        self._handle = None

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor, given whole or as consecutive slices of its first dimension."""
        expected_name, expected_shape = self._order[self._position]
        if name != expected_name:
            raise RuntimeError(f"writer expected tensor {expected_name}, got {name}")
        if self._remaining == 0:
            self._open_next()
        rows = 0
        for chunk in chunks:
            if tuple(chunk.shape[1:]) != tuple(expected_shape[1:]):
                raise RuntimeError(f"{name}: chunk of shape {list(chunk.shape)} for {list(expected_shape)}")
            rows += chunk.shape[0] if chunk.ndim else 1
            data = chunk.detach().to(self.dtype).contiguous().view(torch.uint8).numpy()
            view = memoryview(data).cast("B")
            for start in range(0, len(view), _CHUNK):
                self._emit(view[start : start + _CHUNK])
        if rows != (expected_shape[0] if expected_shape else 1):
            raise RuntimeError(f"{name}: wrote {rows} rows of {list(expected_shape)}")
        self._position += 1
        self._remaining -= 1

    def close(self) -> list[FileInfo]:
        if self._position != len(self._order):
            raise RuntimeError(f"writer closed after {self._position} of {len(self._order)} tensors")
        self._close_current()
        if len(self._names) > 1:
            index = {"metadata": {"total_size": sum(n for s in self._shards for _, _, n in s)},
                     "weight_map": {name: self._names[i] for i, s in enumerate(self._shards) for name, _, _ in s}}
            path = self.folder / "model.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2))
            self.files.append(file_info(path))
        return self.files


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def file_info(path: Path) -> FileInfo:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return FileInfo(path.name, path.stat().st_size, digest.hexdigest())


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of each weight file of a folder, cached beside the files (keyed by size and mtime), so an anchor is
    hashed once, not on every materialization."""
    folder = Path(folder)
    cache_path = folder / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    result, changed = {}, False
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = cache.get(path.name)
        if not entry or entry.get("key") != key:
            entry = {"key": key, "sha256": file_info(path).sha256}
            cache[path.name] = entry
            changed = True
        result[path.name] = entry["sha256"]
    if changed:
        with contextlib.suppress(OSError):  # a read-only anchor folder is hashed again next time, that is all
            write_text_atomically(cache_path, json.dumps(cache, indent=1))
    return result


def copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer and generation files travel with the weights: the vocabulary is fixed within a chain."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
