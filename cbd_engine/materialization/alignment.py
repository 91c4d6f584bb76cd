"""Aligning two anchors that carry no lineage (two public checkpoints of one family), so that the interpolation mixes
corresponding units and not unrelated ones.

S(large) has already chosen which large unit sits at each target position. Here E(small) chooses which of its units
goes to each position by an optimal assignment on weight similarity (scipy's linear_sum_assignment, skipped when
every unit's best match is its own, as between models whose units already correspond):

1. residual channels by the correlation of their embedding (and head) columns over the shared vocabulary;
2. layers by relative depth;
3. per layer, KV groups as whole units, then query heads inside matched groups, then FFN neurons, each by the
   cosine similarity of the unit's weight slices read in the matched residual channels.

The unit features come from the family's axis declarations, so every family is aligned by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cbd_engine.materialization.transforms import (
    NEW,
    LayerMap,
    Plan,
    fill_fresh_sources,
    layers_with_copies,
    select_layers,
)
from cbd_engine.spec.families import FFN, HEADS, KV_HEADS, POSITIONS, RESIDUAL, VOCAB, TensorSpec, unit_rows
from cbd_engine.spec.shapes import Shape


@dataclass
class Assignments:
    """How many unit assignments the alignment made, and how many of them needed a solve: anchors whose units
    already correspond (fine-tunes of one base, a perturbed copy) need none."""

    made: int = 0
    solved: int = 0

    def assign(self, similarity: torch.Tensor) -> list[int]:
        """For each column (target position), the row (source unit) assigned to it, NEW where none: maximal total.

        When each unit of the smaller side has a best match of its own, distinct from every other's, pairing each with
        it is the optimum (every term is at its own maximum: no assignment can do better), found in O(n m) instead of
        the O(n^3) Hungarian solve (scipy's linear_sum_assignment, which also costs 0.3 s to import)."""
        self.made += 1
        rows, columns = similarity.shape
        best = similarity.argmax(dim=1 if rows <= columns else 0).tolist()
        if len(set(best)) == min(rows, columns):
            pairs = enumerate(best) if rows <= columns else ((row, col) for col, row in enumerate(best))
        else:
            from scipy.optimize import linear_sum_assignment

            self.solved += 1
            pairs = zip(*(i.tolist() for i in linear_sum_assignment(similarity.double().numpy(), maximize=True)),
                        strict=True)
        placed = [NEW] * columns
        for row, col in pairs:
            placed[col] = row
        return placed


SKETCH_DIM = 256
# Units inside a layer are compared on at most this many of the matched residual channels: a unit's weights on a
# random sample of its input/output channels estimate its similarity to another unit as the whole does, at a
# fraction of the reads and arithmetic (2.25x less for SmolLM2's 576 channels, 8x for Qwen3-1.7B's 2048).
FEATURE_CHANNELS = 256


@lru_cache(maxsize=16)
def _sketch_map(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of each of n features (seeded by n, so both anchors share them; made once per width)."""
    generator = torch.Generator().manual_seed(n)
    buckets = torch.randint(0, SKETCH_DIM, (n,), generator=generator)
    return buckets, torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def _streamed_column_sketch(anchor, name: str, rows: int, rows_per_read: int = 4096) -> torch.Tensor:
    """The sketch of each column of a [vocab, units] tensor (an embedding), read a slice of rows at a time, so the
    vocabulary-sized features never exist whole: [units, SKETCH_DIM]."""
    buckets, signs = _sketch_map(rows)
    sketch = None
    for start in range(0, rows, rows_per_read):
        stop = min(start + rows_per_read, rows)
        block = anchor.reader.read(name, (start, stop)).float() * signs[start:stop, None]
        sketch = torch.zeros(SKETCH_DIM, block.shape[1]) if sketch is None else sketch
        sketch.index_add_(0, buckets[start:stop], block)
    return sketch.T


def _embed(parts: list[torch.Tensor]) -> torch.Tensor:
    """Feature blocks [n, f_i] of the same n units -> [n, <= SKETCH_DIM]: each row (the blocks side by side) centered,
    count-sketched and of unit length, so that the inner product of two rows is their cosine similarity (a
    correlation for residual columns). The sketch is linear, so the blocks are sketched one by one into one
    accumulator and centered there: the full feature rows are never concatenated. Count sketch keeps inner products
    in expectation and identical rows identical, at O(n f) instead of an n x m x f similarity product."""
    width = sum(part.shape[1] for part in parts)
    if width <= SKETCH_DIM:
        rows = torch.cat(parts, dim=1)
        return torch.nn.functional.normalize(rows - rows.mean(dim=1, keepdim=True), dim=1)
    buckets, signs = _sketch_map(width)
    sketch, total, offset = torch.zeros(parts[0].shape[0], SKETCH_DIM), torch.zeros(parts[0].shape[0]), 0
    for part in parts:
        span = slice(offset, offset + part.shape[1])
        sketch.index_add_(1, buckets[span], part * signs[span])
        total += part.sum(dim=1)
        offset += part.shape[1]
    ones = torch.zeros(SKETCH_DIM).index_add_(0, buckets, signs)  # the sketch of a row of ones
    return torch.nn.functional.normalize(sketch - (total / width)[:, None] * ones, dim=1)


def _unit_dim(spec: TensorSpec, kind: str, context: tuple[str, ...]) -> int | None:
    """The dimension holding `kind` units, if every other dimension is of a `context` kind (single axes only)."""
    kinds = [axes[0].kind if len(axes) == 1 else None for axes in spec.dims]
    if kinds.count(kind) != 1 or any(k not in context for i, k in enumerate(kinds) if k != kind):
        return None
    return kinds.index(kind)


def unit_features(anchor, layer: int | None, kind: str, channels: list[int]) -> list[torch.Tensor] | None:
    """Blocks [units, features_i]: every tensor slice of each unit of `kind` (in `layer`), residual dims cut to
    `channels`; None when no tensor holds that kind alone (GPT-2's KV heads live only inside the fused c_attn)."""
    arch, shape = anchor.spec.architecture, anchor.shape
    context = (RESIDUAL,) if kind != RESIDUAL else (VOCAB, POSITIONS)
    parts = []
    for spec in arch.tensors:
        if spec.per_layer != (layer is not None):
            continue
        dim = _unit_dim(spec, kind, context)
        if dim is None:
            continue
        if kind == RESIDUAL and len(spec.dims) == 2 and dim == 1:  # an embedding or head, [vocab, residual]
            parts.append(_streamed_column_sketch(anchor, spec.name, anchor.reader.info(spec.name).shape[0]))
            continue
        tensor = anchor.reader.read(spec.name.format(layer=layer) if layer is not None else spec.name).float()
        for other in range(tensor.ndim):
            if other != dim and spec.dims[other][0].kind == RESIDUAL:
                tensor = tensor.index_select(other, torch.tensor(channels, dtype=torch.long))
        rows = unit_rows(shape, spec.dims[dim][0])
        parts.append(tensor.movedim(dim, 0).reshape(tensor.shape[dim] // rows, -1))
    return parts or None


def _similarity(small: torch.Tensor, large: torch.Tensor, large_units: list[int]) -> torch.Tensor:
    """[small units, target positions] from embedded features (`_embed`); a position S filled with a new unit
    matches nothing."""
    known = [j for j, u in enumerate(large_units) if u != NEW]
    if len(known) == len(large_units):
        return small @ large[torch.tensor(large_units)].T
    similarity = torch.zeros(small.shape[0], len(large_units))
    if known:
        similarity[:, known] = small @ large[torch.tensor([large_units[j] for j in known])].T
    return similarity


def align_to(small, large, plan_s: Plan, target: Shape, grow: str = "zero",
             assignments: Assignments | None = None) -> Plan:
    """E's plan: the small anchor's units placed where S keeps the large units most similar to them; `assignments`
    counts the matchings made and solved."""
    assignments = assignments if assignments is not None else Assignments()
    s_shape = small.shape
    residual = assignments.assign(_similarity(_embed(unit_features(small, None, RESIDUAL, [])),
                                              _embed(unit_features(large, None, RESIDUAL, [])), plan_s.residual))
    matched = [j for j, (e, s) in enumerate(zip(residual, plan_s.residual, strict=True)) if e != NEW and s != NEW]
    if len(matched) > FEATURE_CHANNELS:  # a fixed sample of the matched channels (seeded: runs repeat)
        sample = torch.randperm(len(matched), generator=torch.Generator().manual_seed(len(matched)))
        matched = sorted(matched[i] for i in sample[:FEATURE_CHANNELS].tolist())
    small_channels = [residual[j] for j in matched]
    large_channels = [plan_s.residual[j] for j in matched]

    placed = fill_fresh_sources(select_layers(s_shape.num_layers, target.num_layers))
    unit_maps = {}
    for (small_layer, fresh), s_layer in zip(placed, plan_s.layers, strict=True):
        if not fresh:
            heads, kv_heads = _align_heads(small, large, small_layer, s_layer, target, small_channels, large_channels,
                                           assignments)
            ffn = assignments.assign(_similarity(_embed(unit_features(small, small_layer, FFN, small_channels)),
                                                 _embed(unit_features(large, s_layer.source, FFN, large_channels)),
                                                 s_layer.ffn))
            unit_maps[small_layer] = (heads, kv_heads, ffn)
    layers = layers_with_copies(placed, unit_maps, grow)
    plan = Plan(residual, layers)
    plan.validate(s_shape, target)
    return plan


def _align_heads(small, large, small_layer: int, s_layer: LayerMap, target: Shape, small_channels: list[int],
                 large_channels: list[int], assignments: Assignments) -> tuple[list[int], list[int]]:
    """KV groups as whole units first; then query heads only within the matched groups, so GQA stays intact."""
    small_q = _embed(unit_features(small, small_layer, HEADS, small_channels))
    large_q = _embed(unit_features(large, s_layer.source, HEADS, large_channels))
    small_kv = unit_features(small, small_layer, KV_HEADS, small_channels)
    large_kv = unit_features(large, s_layer.source, KV_HEADS, large_channels)
    if small_kv is None:  # no grouped-query attention in this family: a KV head is its query head
        small_kv, large_kv = small_q, large_q
    else:
        small_kv, large_kv = _embed(small_kv), _embed(large_kv)
    kv_heads = assignments.assign(_similarity(small_kv, large_kv, s_layer.kv_heads))
    r_small, r_target = small.shape.group_size, target.group_size
    heads = []
    for position, group in enumerate(kv_heads):
        slots = s_layer.heads[position * r_target : (position + 1) * r_target]
        if group == NEW:
            heads += [NEW] * r_target
            continue
        members = list(range(group * r_small, (group + 1) * r_small))
        local = assignments.assign(_similarity(small_q[members], large_q, slots))
        heads += [members[m] if m != NEW else NEW for m in local]
    return heads, kv_heads
