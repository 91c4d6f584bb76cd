"""Execution: the target's tensors streamed one at a time (vocabulary-sized ones in row slices) into safetensors in
an atomically written folder, with config.json, side files and the provenance in cbd.json."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cbd_engine.io.atomic import atomic_output_dir
from cbd_engine.io.checkpoint import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    FileInfo,
    StreamingWriter,
    copy_side_files,
    file_info,
    folder_hashes,
)
from cbd_engine.materialization.anchor import Anchor, Term
from cbd_engine.spec.families import POSITIONS, VOCAB, TensorSpec
from cbd_engine.spec.progress import Cancelled, ProgressCallback, StageTimer
from cbd_engine.spec.shapes import (
    Shape,
)

CHUNK_BYTES = 16 * 2**20


@dataclass
class MaterializeResult:
    out: Path
    shape: Shape
    params: int
    alpha: float | None
    files: list[FileInfo]
    provenance: dict = field(repr=False)


TensorSource = Callable[[TensorSpec, str, int | None, tuple[int, int] | None], torch.Tensor]


def _chunked(spec: TensorSpec) -> bool:
    """Embeddings and heads are cut along the vocabulary into row slices: their first axis never changes, and no
    other axis of theirs needs whole-tensor statistics."""
    return spec.dims[0][0].kind in (VOCAB, POSITIONS)


TensorStream = Iterator[tuple[str, Iterator[torch.Tensor]]]  # (name, slices along the first dimension)


def iter_tensors(tensor_of: TensorSource, target: Shape, anchor: Anchor) -> TensorStream:
    """(name, slices) for every target tensor in checkpoint order; slices concatenate along the first dimension.
    `tensor_of(spec, name, layer, rows)` makes one tensor (rows: a slice of a vocabulary-sized one)."""
    arch = anchor.spec.architecture
    for name, spec, layer_index in arch.tensor_names(target):
        shape = arch.tensor_shape(spec, target)
        if _chunked(spec):
            step = max(1, CHUNK_BYTES // (4 * max(1, shape[1] if len(shape) > 1 else 1)))
            yield name, (tensor_of(spec, name, layer_index, (r, min(r + step, shape[0])))
                         for r in range(0, shape[0], step))
        else:
            yield name, iter([tensor_of(spec, name, layer_index, None)])


def state_dict(tensors: TensorStream) -> dict[str, torch.Tensor]:
    return {name: torch.cat(list(slices)) for name, slices in tensors}


def write_model(out: str | Path, config: dict, side_files_from: Anchor, tensors: TensorStream, target: Shape,
           dtype: torch.dtype, provenance: dict, progress: ProgressCallback, should_stop: Callable[[], bool] | None,
           max_shard_bytes: int | None) -> MaterializeResult:
    arch = side_files_from.spec.architecture
    layout = [(name, arch.tensor_shape(spec, target)) for name, spec, _ in arch.tensor_names(target)]
    timer = StageTimer("materialize", len(layout), progress)
    timer.update(0)
    config = {**config, "dtype": DTYPE_NAMES[dtype]}
    with (atomic_output_dir(out) as tmp, single_thread(),
          StreamingWriter(tmp, layout, dtype, max_shard_bytes or DEFAULT_SHARD_BYTES) as writer):
        for step, (name, slices) in enumerate(tensors, 1):
            if should_stop is not None and should_stop():
                raise Cancelled("materialization cancelled")
            writer.write(name, slices)
            timer.update(step)
        files = writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_side_files(side_files_from.path, tmp)
        (tmp / "cbd.json").write_text(json.dumps(provenance, indent=2))
        weights = {f.name for f in files}
        files += [file_info(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in weights]
    params = arch.num_params(target)
    return MaterializeResult(Path(out), target, params, provenance.get("alpha"), files, provenance)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch ops on one thread each: the streaming loop is memory-bound elementwise work on small tensors, one thread
    is as fast, and on a busy machine several threads spin-waiting on each other were measured 30x slower (the
    parallelism that pays is the writer's thread, or a pool of Python threads, each with its own tensor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def term_record(term: Term, role: str) -> dict:
    return {"role": role, "anchor": str(term.anchor.path), "plan": term.plan.to_dict()}


def lineage_record(term: Term) -> dict:
    """A pure transform of one anchor: later interpolation aligns with it through this record."""
    return {"parent": str(term.anchor.path), "parent_sha256": folder_hashes(term.anchor.path),
            "plan": term.plan.to_dict()}


