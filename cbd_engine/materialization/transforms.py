"""Index-map plans and the one generic tensor transform that expands, subsets and keeps every axis of every family.

A `Plan` says, for one source model and one target shape, which source unit fills each target position, per axis:
residual channels (global), layers, and per target layer its query heads, KV heads and FFN neurons. -1 marks a new
unit. `transform_tensor` applies a plan to one tensor using the family's axis declarations (cbd_engine.spec.families):

* new units that a tensor *reads* (its input side) are zero, so they contribute nothing;
* new heads / KV heads / FFN neurons that a tensor *produces* get seeded random rows (their readers are zero);
* new residual channels produced by a tensor are zero under RMSNorm and the mean of the old channels under
  LayerNorm (mean-padding keeps the LayerNorm statistics; zero-padding would shift the mean);
* norm gains are rescaled by sqrt(d/d') and epsilon by d/d' (`grown_eps`), so a wider residual keeps the function
  (`rescale_gains=False` leaves them as they are: the per-unit mix keeps the larger anchor's width statistics);
* a fresh layer (-1 in the layer map) is a copy of a neighbour with its residual writers zeroed: an exact identity.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from cbd_engine.spec.families import (
    FFN,
    GAIN,
    HEADS,
    IN,
    KV_HEADS,
    OUT,
    RESIDUAL,
    RESIZABLE,
    SHIFT,
    Architecture,
    Axis,
    TensorSpec,
    axis_units,
    unit_rows,
)
from cbd_engine.spec.shapes import Shape, ShapeError

NEW = -1


@dataclass
class LayerMap:
    source: int  # the source layer this target layer is built from
    fresh: bool  # True: a new, inert layer (residual writers zeroed), copied from `source`
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]


@dataclass
class Plan:
    residual: list[int]
    layers: list[LayerMap]

    def to_dict(self) -> dict:
        return {"residual": self.residual, "layers": [vars(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(list(data["residual"]), [LayerMap(**layer) for layer in data["layers"]])

    def is_identity(self, source: Shape) -> bool:
        def ident(m: list[int], n: int) -> bool:
            return m == list(range(n))

        return ident(self.residual, source.hidden_size) and len(self.layers) == source.num_layers and all(
            layer.source == i and not layer.fresh and ident(layer.heads, source.num_heads)
            and ident(layer.kv_heads, source.num_kv_heads) and ident(layer.ffn, source.intermediate_size)
            for i, layer in enumerate(self.layers)
        )

    def validate(self, source: Shape, target: Shape) -> None:
        """Every map has the target's length, points into the source, and keeps each query head with its KV head."""
        _check_map("residual", self.residual, source.hidden_size, target.hidden_size)
        if len(self.layers) != target.num_layers:
            raise ShapeError(f"plan has {len(self.layers)} layers, target has {target.num_layers}")
        for j, layer in enumerate(self.layers):
            if not 0 <= layer.source < source.num_layers:
                raise ShapeError(f"layer {j}: source layer {layer.source} outside [0, {source.num_layers})")
            _check_map(f"layer {j} heads", layer.heads, source.num_heads, target.num_heads)
            _check_map(f"layer {j} kv_heads", layer.kv_heads, source.num_kv_heads, target.num_kv_heads)
            _check_map(f"layer {j} ffn", layer.ffn, source.intermediate_size, target.intermediate_size)
            for position, head in enumerate(layer.heads):
                group = layer.kv_heads[position // target.group_size]
                if head != NEW and head // source.group_size != group:
                    raise ShapeError(
                        f"layer {j}: query head {head} would leave its KV head {head // source.group_size} "
                        f"for {group}; GQA groups must stay intact"
                    )


def _check_map(name: str, mapping: list[int], n_source: int, n_target: int) -> None:
    if len(mapping) != n_target:
        raise ShapeError(f"{name} map has {len(mapping)} entries, target has {n_target}")
    kept = [u for u in mapping if u != NEW]
    if any(not 0 <= u < n_source for u in kept) or len(set(kept)) != len(kept):
        raise ShapeError(f"{name} map must name distinct source units in [0, {n_source})")


# ---------------------------------------------------------------- choosing units


def select_units(n_source: int, n_target: int, scores: list[float] | None = None, keep: list[int] = ()) -> list[int]:
    """Shrink: the `keep` units, topped up by score (or the first ones), in original order. Grow: all, then new."""
    if n_target >= n_source:
        return list(range(n_source)) + [NEW] * (n_target - n_source)
    scores = scores if scores is not None else [float(n_source - u) for u in range(n_source)]
    keep = [u for u in keep if u != NEW]
    if len(keep) > n_target:
        keep = sorted(keep, key=lambda u: -scores[u])[:n_target]
    return sorted(priority(n_source, keep, scores)[:n_target])


def priority(n: int, keep: list[int], scores: list[float] | None) -> list[int]:
    """All `n` units in the order a shrinking axis gives them up last: `keep` first, as it orders them, then the
    others by score (highest first; ties, or no scores, by index)."""
    kept = [u for u in keep if u != NEW]
    chosen = set(kept)
    score = scores if scores is not None else [0.0] * n
    return kept + sorted((u for u in range(n) if u not in chosen), key=lambda u: (-score[u], u))


def select_layers(n_source: int, n_target: int, scores: list[float] | None = None, keep: list[int] = ()) -> list[int]:
    """Shrink by importance (or evenly without scores); grow by spreading the source layers at their relative depth
    with new layers (NEW) between them."""
    if n_target >= n_source:
        placed = [NEW] * n_target
        for i in range(n_source):
            placed[round(i * (n_target - 1) / (n_source - 1)) if n_source > 1 else 0] = i
        return placed
    if scores is None and not keep:
        return sorted({round(i * (n_source - 1) / (n_target - 1)) if n_target > 1 else 0 for i in range(n_target)})
    return select_units(n_source, n_target, scores, keep)


def select_heads(source: Shape, target: Shape, scores: list[float] | None = None, keep_heads: list[int] = (),
                 keep_kv: list[int] = ()) -> tuple[list[int], list[int]]:
    """Whole KV groups first (by the summed score of their query heads), then query heads inside each group."""
    r_source, r_target = source.group_size, target.group_size
    scores = scores if scores is not None else [float(source.num_heads - h) for h in range(source.num_heads)]
    group_scores = [sum(scores[g * r_source : (g + 1) * r_source]) for g in range(source.num_kv_heads)]
    kv_map = select_units(source.num_kv_heads, target.num_kv_heads, group_scores, keep_kv)
    heads_map: list[int] = []
    for group in kv_map:
        if group == NEW:
            heads_map += [NEW] * r_target
            continue
        members = [h - group * r_source for h in keep_heads if h != NEW and h // r_source == group]
        local = select_units(r_source, r_target, scores[group * r_source : (group + 1) * r_source], members)
        heads_map += [NEW if h == NEW else group * r_source + h for h in local]
    return heads_map, kv_map


def compose(first: Plan, then: Plan) -> Plan:
    """One plan for `then` applied to what `first` made (`then` adds no units: a subset or a reordering)."""
    def through(outer: list[int], inner: list[int]) -> list[int]:
        return [inner[u] for u in outer]

    layers = [LayerMap(first.layers[layer.source].source, first.layers[layer.source].fresh,
                       through(layer.heads, first.layers[layer.source].heads),
                       through(layer.kv_heads, first.layers[layer.source].kv_heads),
                       through(layer.ffn, first.layers[layer.source].ffn)) for layer in then.layers]
    return Plan(through(then.residual, first.residual), layers)


def fill_fresh_sources(layer_sources: list[int]) -> list[tuple[int, bool]]:
    """(source, fresh) per target layer: a NEW layer copies the nearest placed layer before it (after it at the top)."""
    placed = [s for s in layer_sources if s != NEW]
    if not placed:
        raise ShapeError("a plan needs at least one source layer")
    result, previous = [], None
    for source in layer_sources:
        if source != NEW:
            previous = source
            result.append((source, False))
        else:
            result.append((previous if previous is not None else placed[0], True))
    return result


def layers_with_copies(placed: list[tuple[int, bool]], unit_maps: dict[int, tuple[list[int], list[int], list[int]]],
                       grow: str) -> list[LayerMap]:
    """Layer maps from (source, fresh) pairs and each placed source's (heads, kv_heads, ffn) maps: a fresh layer is a
    copy of its neighbour as placed, units in the same positions, so it mixes like its neighbour would."""
    return [LayerMap(source, fresh and grow == "zero", *unit_maps[source]) for source, fresh in placed]


# ---------------------------------------------------------------- applying a plan to one tensor


def _unit_map(axis: Axis, plan: Plan, layer: LayerMap | None) -> list[int] | None:
    if axis.kind == RESIDUAL:
        return plan.residual
    if layer is None:
        return None
    return {HEADS: layer.heads, KV_HEADS: layer.kv_heads, FFN: layer.ffn}.get(axis.kind)


def row_index(dim: tuple[Axis, ...], plan: Plan, layer: LayerMap | None, source: Shape) -> torch.Tensor | None:
    """Source row for each target row along one dimension (NEW for new rows), or None when the dimension is kept."""
    if dim[0].kind not in RESIZABLE:  # vocabulary, positions and head_dim are fixed within a chain
        return None
    parts, offset, changed = [], 0, False
    for axis in dim:
        rows, n_units = unit_rows(source, axis), axis_units(source, axis.kind)
        units = _unit_map(axis, plan, layer)
        if units is None or units == list(range(n_units)):
            parts.append(torch.arange(offset, offset + n_units * rows))
        else:
            changed = True
            unit = torch.tensor(units, dtype=torch.long)
            index = (unit[:, None] * rows + torch.arange(rows)[None, :] + offset).reshape(-1)
            parts.append(torch.where(unit.repeat_interleave(rows) == NEW, NEW, index))
        offset += n_units * rows
    return torch.cat(parts) if changed else None


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _fill(tensor: torch.Tensor, dim: int, new: torch.Tensor, axis: Axis, norm: str, std: float,
          generator: torch.Generator, rescale_gains: bool) -> torch.Tensor:
    """Values for the new rows (`new` marks them along `dim`) of one dimension, by what the dimension means. Runs on
    the tensor in its final layout, so a fill never depends on how the source's units were ordered."""
    shape = [1] * tensor.ndim
    shape[dim] = -1
    mask = new.view(shape).expand_as(tensor)
    kept = tensor.index_select(dim, (~new).nonzero().flatten())
    if axis.role in (IN, SHIFT):
        return tensor.masked_fill(mask, 0.0)
    if axis.kind == RESIDUAL and axis.role == OUT:
        if norm == "layernorm":  # mean-padding: the new channels carry the mean, so LayerNorm's mean is unchanged
            return torch.where(mask, kept.mean(dim=dim, keepdim=True).expand_as(tensor), tensor)
        return tensor.masked_fill(mask, 0.0)
    if axis.role == GAIN:
        scale = math.sqrt(kept.shape[dim] / new.numel()) if rescale_gains else 1.0
        fill = kept.mean() * scale if kept.numel() else torch.tensor(1.0)
        return torch.where(mask, fill, tensor * scale)
    # a produced head / KV head / FFN unit: random rows (its readers are zero), biases zero
    if tensor.ndim == 1:
        return tensor.masked_fill(mask, 0.0)
    noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std
    return torch.where(mask, noise, tensor)


def transform_tensor(tensor: torch.Tensor, spec: TensorSpec, name: str, plan: Plan, layer: LayerMap | None,
                     source: Shape, norm: str, seed: int, rescale_gains: bool = True) -> torch.Tensor:
    """Apply `plan` to one tensor of the source model. Kept dimensions are untouched (bitwise).

    First every dimension is gathered into the target layout, then new rows are filled dimension by dimension, in
    float32. A tensor that only loses or reorders rows stays in its own dtype: a gather is exact in any dtype, so
    the result is the same bits as in float32, without the float32 copy (a pruned bfloat16 model's largest cost)."""
    indices = [(dim, axes, row_index(axes, plan, layer, source)) for dim, axes in enumerate(spec.dims)]
    new_rows = [(dim, index == NEW, axes[0]) for dim, axes, index in indices
                if index is not None and bool((index == NEW).any())]
    if new_rows:
        tensor = tensor.float()
        std = float(tensor.std()) if tensor.numel() > 1 else 0.0  # of the source's values: a new unit's noise scale
    for dim, _, index in indices:
        if index is not None:
            tensor = tensor.index_select(dim, index.clamp(min=0))
    if new_rows:
        generator = _seeded_generator(seed, name)
        for dim, new, axis in new_rows:
            tensor = _fill(tensor, dim, new, axis, norm, std or 0.02, generator, rescale_gains)
    if layer is not None and layer.fresh and spec.writes_residual:
        tensor = torch.zeros_like(tensor)
    return tensor


def presence(shape: torch.Size, spec: TensorSpec, plan: Plan, layer: LayerMap | None, source: Shape) -> torch.Tensor:
    """True at the entries of a transformed tensor (of `shape`) that hold the source's own weights: every index along
    every dimension a kept unit, in a layer that is not a fresh copy. False marks fills (new units, inert layers)."""
    if layer is not None and layer.fresh:
        return torch.zeros(shape, dtype=torch.bool)
    mask = torch.ones(shape, dtype=torch.bool)
    for dim, axes in enumerate(spec.dims):
        index = row_index(axes, plan, layer, source)
        if index is not None:
            view = [1] * len(shape)
            view[dim] = -1
            mask = mask & (index != NEW).view(view)
    return mask


def grown_eps(eps: float, plan: Plan, target: Shape) -> float:
    """Norm epsilon for a grown residual: with d kept channels of d' in all, mean(x^2) shrinks by d/d', so epsilon
    must too (and gains by sqrt(d/d')) for the normalized values to stay the same."""
    kept = sum(1 for u in plan.residual if u != NEW)
    return eps * kept / target.hidden_size if kept < target.hidden_size else eps


def check_architecture_match(a: Architecture, b: Architecture) -> None:
    if a.family != b.family or [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        raise ShapeError(
            f"anchors differ in architecture ({a.family} {a.flags.get('model_type')} vs "
            f"{b.family} {b.flags.get('model_type')}); a chain has one family and one vocabulary"
        )
