"""Hugging Face checkpoint folders: streaming safetensors I/O, side files, cached hashes (atomic output: atomic.py).

The safetensors package maps whole files (touched pages stay resident) and writes whole dicts only; the
materializer needs one tensor in memory at a time on both sides, so this module maps one tensor at a time and
writes a planned layout tensor by tensor, hashing and writing on a thread of its own while the caller makes the
next tensor.
The format itself is what safetensors specifies: an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
IN_FLIGHT_BYTES = 64 * 2**20  # tensors handed to the hashing and writing threads, not yet taken
# hashed and written a slice at a time: one 1 GiB write() measured 3.2-4.5 s, 1 MiB slices also hashed 1.7-3.4 s
EMIT_BYTES = 2**20


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
        self._lock = threading.Lock()

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
        """One tensor, or rows [start, stop) of its first dimension, as a private memory map of just its bytes: the
        page cache is read in place, with no copy (a third of a 1.7B prune's CPU time went to copying with pread),
        and the map is undone when the tensor is freed, so only tensors in use stay resident. Private: writes to
        the tensor copy the pages they touch and never reach the file."""
        info = self.info(name)
        if info.dtype not in DTYPES:
            raise ValueError(f"tensor {name} has dtype {info.dtype}; supported: {sorted(DTYPES)}")
        shape, start, end = info.shape, info.start, info.end
        if rows is not None:
            row_bytes = (end - start) // shape[0] if shape and shape[0] else 0
            shape = (rows[1] - rows[0], *shape[1:])
            start, end = info.start + rows[0] * row_bytes, info.start + rows[1] * row_bytes
        dtype = DTYPES[info.dtype]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        with self._lock:  # threads share one descriptor per file
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=base)
        return torch.frombuffer(mapping, dtype=dtype, count=(end - start) // dtype.itemsize,
                                offset=start - base).reshape(shape)

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


class _Stage:
    """One consumer of a writer's messages, ("open", shard), ("data", bytes) and ("close", shard), taken in order on
    a thread of its own. Its first error is kept for the caller; later messages are only counted off."""

    def __init__(self, name: str, handle: Callable[[str, Any], None], room: threading.Condition):
        self.handle, self.room = handle, room
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0  # bytes handed over and not yet taken (guarded by `room`)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (message := self.messages.get()) is not None:
            kind, payload, nbytes = message
            try:
                if self.error is None:
                    self.handle(kind, payload)
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread at its next call
                self.error = error
            with self.room:
                self.in_flight -= nbytes
                self.room.notify_all()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.messages.put(None)
            self.thread.join()


class StreamingWriter:
    """Writes a planned list of tensors into `model.safetensors` (or shards plus an index), one tensor at a time,
    hashing every byte. Tensors must be written in the planned order with the planned shapes.

    Hashing and writing each run on a thread of their own (hashlib and file writes release the GIL), so the caller
    makes the next tensor meanwhile; each holds at most IN_FLIGHT_BYTES of handed-over tensors (or one larger one).
    Use it as a context manager, or call close(): either way the threads have finished before the folder is used."""

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
        self._opened = -1  # the shard being written (the caller's side)
        self._remaining = 0
        self._handle = None  # the writing thread's open shard
        self._hash = hashlib.sha256()  # the hashing thread's
        self._digests: list[str] = []
        self._room = threading.Condition()
        self._stages = [_Stage("safetensors-hash", self._hash_message, self._room),
                        _Stage("safetensors-write", self._write_message, self._room)]

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _hash_message(self, kind: str, payload: Any) -> None:
        if kind == "open":
            self._hash = hashlib.sha256()
        elif kind == "data":
            for start in range(0, len(payload), EMIT_BYTES):
                self._hash.update(payload[start : start + EMIT_BYTES])
        else:
            self._digests.append(self._hash.hexdigest())

    def _write_message(self, kind: str, payload: Any) -> None:
        if kind == "open":
            self._handle = open(self.folder / self._names[payload], "wb")
        elif kind == "data":
            for start in range(0, len(payload), EMIT_BYTES):
                self._handle.write(payload[start : start + EMIT_BYTES])
        else:
            self._handle.close()
            self._handle = None

    def _send(self, kind: str, payload: Any = None, nbytes: int = 0) -> None:
        with self._room:
            while (any(stage.in_flight for stage in self._stages) and not self._failed()
                   and max(stage.in_flight for stage in self._stages) + nbytes > IN_FLIGHT_BYTES):
                self._room.wait()
            if error := self._failed():
                raise error
            for stage in self._stages:
                stage.in_flight += nbytes
                stage.messages.put((kind, payload, nbytes))

    def _failed(self) -> BaseException | None:
        return next((stage.error for stage in self._stages if stage.error is not None), None)

    def _stop(self) -> None:
        for stage in self._stages:
            stage.stop()
        if self._handle is not None:  # stopped early: the folder is discarded, the file only closed
            self._handle.close()
            self._handle = None

    def _header(self, shard: int) -> bytes:
        offset, header = 0, {"__metadata__": {"format": "pt"}}
        for name, shape, nbytes in self._shards[shard]:
            header[name] = {"dtype": SAFETENSORS_CODES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor, given whole or as consecutive slices of its first dimension. A chunk must
        not change after it is handed over (the threads read it later)."""
        expected_name, expected_shape = self._order[self._position]
        if name != expected_name:
            raise RuntimeError(f"writer expected tensor {expected_name}, got {name}")
        if self._remaining == 0:
            if self._opened >= 0:
                self._send("close", self._opened)
            self._opened += 1
            self._remaining = len(self._shards[self._opened])
            self._send("open", self._opened)
            header = memoryview(self._header(self._opened))
            self._send("data", header, len(header))
        rows = 0
        for chunk in chunks:
            if tuple(chunk.shape[1:]) != tuple(expected_shape[1:]):
                raise RuntimeError(f"{name}: chunk of shape {list(chunk.shape)} for {list(expected_shape)}")
            rows += chunk.shape[0] if chunk.ndim else 1
            data = memoryview(chunk.detach().to(self.dtype).contiguous().view(torch.uint8).numpy()).cast("B")
            self._send("data", data, len(data))
        if rows != (expected_shape[0] if expected_shape else 1):
            raise RuntimeError(f"{name}: wrote {rows} rows of {list(expected_shape)}")
        self._position += 1
        self._remaining -= 1

    def close(self) -> list[FileInfo]:
        """Finish the last shard and wait for both threads; the files with their sizes and sha256."""
        if self._position != len(self._order):
            self._stop()
            raise RuntimeError(f"writer closed after {self._position} of {len(self._order)} tensors")
        if self._opened >= 0:
            self._send("close", self._opened)
        self._stop()
        if error := self._failed():
            raise error
        files = [FileInfo(name, (self.folder / name).stat().st_size, digest)
                 for name, digest in zip(self._names, self._digests, strict=True)]
        if len(self._names) > 1:
            index = {"metadata": {"total_size": sum(n for s in self._shards for _, _, n in s)},
                     "weight_map": {name: self._names[i] for i, s in enumerate(self._shards) for name, _, _ in s}}
            path = self.folder / "model.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2))
            files.append(file_info(path))
        return files


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
