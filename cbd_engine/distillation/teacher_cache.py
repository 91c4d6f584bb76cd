"""A teacher-output cache for off-policy distillation.

Off-policy, the teacher scores fixed sequences (the data set's responses), so its output at every scored position
can be computed once and reused across epochs, runs and students. What is kept per position is the teacher's
distribution as its top k (`losses.TeacherTopK`): the ids of its k most likely tokens (int32), their
log-probabilities, and the log of the remaining tail mass; `losses.sparse_divergence` compares the student with it,
the tail modelled as DistillConfig.teacher_cache_tail says (a loss setting: not part of the key).
On-policy modes score the student's own samples, which no cache can hold (DistillConfig refuses the combination).

One folder per key, under `<root>/<key>` (root: `$CBD_CACHE_DIR/teacher-outputs`), written atomically:
    cache.json                   settings, sizes, build time, and the shards: [{file, first, count}]
    shard-00000.safetensors ...  ids [P, k] int32, log_probs [P, k], tail [P], offsets [count + 1] int64
Example `first + j` of a shard owns rows offsets[j] : offsets[j + 1], in position order: the order in which a
batch's scored positions are flattened (`hidden[scored]`), so a batch's rows are its examples' rows concatenated.

The key is a sha256 of what the stored values depend on: the teacher's weight files (sha256, cached beside them) and
config, the encoded examples (token ids and labels; the prompt format and max length act through them), k, the
temperature, the teacher's precision (bf16 autocast or not) and the stored dtype. A second build with the same key
finds the folder and does nothing; a chain's anchors get one cache per teacher.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cbd_engine.data.batches import Batch, Example, collate, response_positions
from cbd_engine.io.atomic import atomic_output_dir
from cbd_engine.io.checkpoint import folder_hashes, parse_dtype
from cbd_engine.nn.device import autocast_for
from cbd_engine.nn.loading import hidden_states, load_model, output_head
from cbd_engine.nn.losses import TeacherTopK, bucket_log_probs, default_chunk
from cbd_engine.spec.progress import ProgressCallback, StageTimer, no_progress

FORMAT = 1
INFO = "cache.json"
SHARD_BYTES = 512 * 2**20  # a shard's arrays are held in memory while it is built


@dataclass(frozen=True)
class CacheSettings:
    top_k: int
    temperature: float = 1.0
    bf16: bool = False  # the teacher ran under bf16 autocast (the default on accelerators)
    dtype: str = "float16"  # of the stored log-probabilities: half the bytes of float32 (docs/DISTILLATION.md)


def default_root() -> Path:
    from cbd_engine.io.cache import cache_dir

    return cache_dir() / "teacher-outputs"


def cache_key(teacher_dir: str | Path, examples: list[Example], settings: CacheSettings) -> str:
    digest = hashlib.sha256()
    teacher = {"weights": folder_hashes(teacher_dir), "config": (Path(teacher_dir) / "config.json").read_text()}
    digest.update(json.dumps({"format": FORMAT, "teacher": teacher, **asdict(settings)}, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()


def teacher_cache_folder(teacher_dir: str | Path, examples: list[Example], settings: CacheSettings,
                         root: str | Path | None = None) -> Path:
    return Path(root or default_root()) / cache_key(teacher_dir, examples, settings)


@torch.no_grad()
def teacher_top_k(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  scored: torch.Tensor, top_k: int, temperature: float = 1.0) -> TeacherTopK:
    """The teacher's k + 1 buckets at the scored positions of a batch (flattened row by row), its output layer
    applied a chunk of positions at a time, as in the loss."""
    hidden = hidden_states(teacher, input_ids, attention_mask)[scored]
    head = output_head(teacher)
    chunk = default_chunk(hidden.device, head.weight.shape[0])
    parts = []
    for start in range(0, max(hidden.shape[0], 1), chunk):  # one (empty) chunk when nothing is scored
        logits = head(hidden[start : start + chunk])
        ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
        parts.append(TeacherTopK(ids, *bucket_log_probs(logits, ids, temperature)))
    return concat(parts)


def concat(parts: list[TeacherTopK]) -> TeacherTopK:
    return TeacherTopK(torch.cat([p.ids for p in parts]), torch.cat([p.log_probs for p in parts]),
                       torch.cat([p.tail for p in parts]))


def _plan_shards(counts: list[int], bytes_per_position: int, shard_bytes: int) -> list[tuple[int, int]]:
    """[first, stop) example ranges holding at most `shard_bytes` each (at least one example)."""
    shards, first, used = [], 0, 0
    for index, count in enumerate(counts):
        if index > first and used + count * bytes_per_position > shard_bytes:
            shards.append((first, index))
            first, used = index, 0
        used += count * bytes_per_position
    shards.append((first, len(counts)))
    return shards


def build_teacher_cache(teacher_dir: str | Path, examples: list[Example], settings: CacheSettings,
                        root: str | Path | None = None, *, device: torch.device | str = "cpu", batch_size: int = 8,
                        shard_bytes: int = SHARD_BYTES, stage: str = "teacher cache",
                        progress: ProgressCallback = no_progress) -> Path:
    """Run the teacher once over `examples` and store its top-k at every scored position; returns the cache folder.
    Does nothing (and loads nothing) when a cache with the same key exists."""
    folder = teacher_cache_folder(teacher_dir, examples, settings, root)
    if (folder / INFO).is_file():
        return folder
    from safetensors.torch import save_file

    started = time.monotonic()
    device = torch.device(device)
    dtype = parse_dtype(settings.dtype)
    teacher = load_model(teacher_dir, device).eval().requires_grad_(False)
    vocab = output_head(teacher).weight.shape[0]
    top_k = min(settings.top_k, vocab)
    bytes_per_position = top_k * (4 + dtype.itemsize) + dtype.itemsize
    counts = [example.num_response_tokens for example in examples]
    shards = _plan_shards(counts, bytes_per_position, shard_bytes)
    timer = StageTimer(stage, sum(-(-(stop - first) // batch_size) for first, stop in shards), progress)
    forwards = 0
    timer.update(forwards)
    with atomic_output_dir(folder) as tmp:
        entries = []
        for number, (first, stop) in enumerate(shards):
            rows: list[TeacherTopK | None] = [None] * (stop - first)
            order = sorted(range(first, stop), key=lambda i: len(examples[i]))  # similar lengths: less padding
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                batch = collate([examples[i] for i in chosen], pad_id=0).to(device)
                with autocast_for(device, settings.bf16):
                    top = teacher_top_k(teacher, batch.input_ids, batch.attention_mask,
                                        response_positions(batch.labels), top_k, settings.temperature).to("cpu")
                offset = 0
                for index in chosen:
                    rows[index - first] = top[offset : offset + counts[index]]
                    offset += counts[index]
                forwards += 1
                timer.update(forwards)
            name = f"shard-{number:05d}.safetensors"
            shard = concat(rows)
            save_file({"ids": shard.ids.to(torch.int32), "log_probs": shard.log_probs.to(dtype),
                       "tail": shard.tail.to(dtype), "offsets": torch.tensor([0] + counts[first:stop]).cumsum(0)},
                      str(tmp / name))
            entries.append({"file": name, "first": first, "count": stop - first})
        info = {"format": FORMAT, "key": folder.name, "teacher": str(teacher_dir), **asdict(settings),
                "top_k": top_k, "requested_top_k": settings.top_k, "vocab": vocab, "examples": len(examples),
                "positions": sum(counts), "bytes": sum((tmp / e["file"]).stat().st_size for e in entries),
                "teacher_forwards": forwards, "build_seconds": time.monotonic() - started, "shards": entries}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
    return folder


class TeacherCache:
    """A built cache, read through safetensors' mmap: `lookup(indices)` returns the rows of those examples,
    concatenated in that order (the order of a batch's flattened scored positions)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.info = json.loads((self.folder / INFO).read_text())
        self.top_k, self.vocab = int(self.info["top_k"]), int(self.info["vocab"])
        self._shards = []
        for entry in self.info["shards"]:
            handle = safe_open(str(self.folder / entry["file"]), framework="pt")
            self._shards.append((entry["first"], handle, handle.get_tensor("offsets").tolist()))
        self._firsts = [first for first, _, _ in self._shards]

    def __len__(self) -> int:
        return int(self.info["examples"])

    def rows(self, index: int) -> TeacherTopK:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} is not in the teacher cache ({len(self)} examples)")
        first, handle, offsets = self._shards[bisect.bisect_right(self._firsts, index) - 1]
        start, stop = offsets[index - first], offsets[index - first + 1]
        return TeacherTopK(*(handle.get_slice(name)[start:stop] for name in ("ids", "log_probs", "tail")))

    def lookup(self, indices: list[int]) -> TeacherTopK:
        top = concat([self.rows(index) for index in indices])
        return TeacherTopK(top.ids.long(), top.log_probs.float(), top.tail.float())

    def for_batch(self, batch: Batch) -> TeacherTopK:
        """The rows of a batch's scored positions, on the batch's device; the batch's examples must carry their
        index into the list the cache was built from (distill.step_examples sets it)."""
        if batch.index is None:
            raise ValueError("a teacher cache needs batches whose examples carry their training-list index")
        top = self.lookup(batch.index)
        scored = int(response_positions(batch.labels).sum())
        if len(top) != scored:
            raise ValueError(f"the teacher cache holds {len(top)} positions for a batch with {scored} scored ones")
        return top.to(batch.labels.device)
