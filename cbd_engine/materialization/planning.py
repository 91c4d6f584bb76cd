"""Planning, apart from execution: the index maps (transforms.Plan) that take each anchor to the target shape,
what a shrinking axis keeps (importance, or the lineage recorded in cbd.json), and how the two anchors' units are
aligned (lineage, Hungarian matching, or none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cbd_engine.data.calibration import Calibration
from cbd_engine.io.cache import cache_dir
from cbd_engine.io.checkpoint import (
    folder_hashes,
)
from cbd_engine.materialization.alignment import Assignments, align_to
from cbd_engine.materialization.anchor import Anchor
from cbd_engine.materialization.importance import Importance, cached_activation_importance, magnitude_importance
from cbd_engine.materialization.transforms import (
    NEW,
    LayerMap,
    Plan,
    fill_fresh_sources,
    layers_with_copies,
    select_heads,
    select_layers,
    select_units,
)
from cbd_engine.spec.families import FFN, HEADS, RESIDUAL
from cbd_engine.spec.progress import ProgressCallback, no_progress
from cbd_engine.spec.shapes import (
    Shape,
    ShapeError,
)


@dataclass
class ImportanceSource:
    """Importance of an anchor's units: activations on the calibration's training texts (cached per anchor and
    calibration), or weight magnitude when asked for by name."""

    calibration: Calibration
    kind: str = "activation"
    progress: ProgressCallback = no_progress

    def __call__(self, anchor: Anchor, target: Shape) -> Importance:
        """The importance a plan from `anchor` to `target` needs: magnitude measures only the axes that shrink (each
        costs a read of its tensors); one activation pass measures all of them at once."""
        if self.kind == "magnitude":
            return magnitude_importance(anchor.path, anchor.spec, shrinking_kinds(anchor.shape, target))
        return cached_activation_importance(anchor.path, list(self.calibration.importance), cache_dir() / "importance",
                                            self.progress)

    def describe(self) -> dict:
        if self.kind == "magnitude":
            return {"kind": "magnitude"}
        return {"kind": "activation", "calibration": self.calibration.source,
                "rows": len(self.calibration.importance)}


def _shrinks(source: Shape, target: Shape) -> bool:
    return any(getattr(target, a) < getattr(source, a)
               for a in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"))


def shrinking_kinds(source: Shape, target: Shape) -> tuple[str, ...]:
    """The unit kinds whose scores decide what a plan keeps (build_plan reads no scores of an axis that does not
    shrink); KV groups are ranked by their query heads' scores."""
    shrinks = {RESIDUAL: target.hidden_size < source.hidden_size,
               HEADS: target.num_heads < source.num_heads or target.num_kv_heads < source.num_kv_heads,
               FFN: target.intermediate_size < source.intermediate_size}
    return tuple(kind for kind, shrinking in shrinks.items() if shrinking)


def plan_single(anchor: Anchor, target: Shape, importance_of: Callable[[Anchor, Shape], Importance],
                grow: str) -> Plan:
    """One anchor to the target shape: importance decides what a shrinking axis keeps, growth appends new units."""
    importance = importance_of(anchor, target) if _shrinks(anchor.shape, target) else None
    return build_plan(anchor.shape, target, importance, grow=grow)


def build_plan(source: Shape, target: Shape, importance: Importance | None, grow: str = "zero",
               lineage: Plan | None = None) -> Plan:
    """Index maps for every axis. With `lineage` (how a smaller model was cut from this one), the units it came from
    are kept first and the rest topped up by importance."""
    imp = importance or Importance("none", None, None, None, None)  # no scores: first units, even depth
    keep_layers = [layer.source for layer in lineage.layers if not layer.fresh] if lineage else []
    layer_sources = select_layers(source.num_layers, target.num_layers, imp.layers, keep_layers)
    residual = select_units(source.hidden_size, target.hidden_size, imp.residual, lineage.residual if lineage else [])
    layers = []
    for source_layer, fresh in fill_fresh_sources(layer_sources):
        kept = _lineage_layer(lineage, source_layer) if lineage and not fresh else None
        heads, kv_heads = select_heads(source, target, imp.heads[source_layer] if imp.heads else None,
                                       kept.heads if kept else [], kept.kv_heads if kept else [])
        ffn = select_units(source.intermediate_size, target.intermediate_size,
                           imp.ffn[source_layer] if imp.ffn else None, kept.ffn if kept else [])
        layers.append(LayerMap(source_layer, fresh and grow == "zero", heads, kv_heads, ffn))
    plan = Plan(residual, layers)
    plan.validate(source, target)
    return plan


def _lineage_layer(lineage: Plan, large_layer: int) -> LayerMap | None:
    return next((layer for layer in lineage.layers if layer.source == large_layer and not layer.fresh), None)


def _placed(large_map: list[int], small_from_large: list[int]) -> list[int]:
    """E's map: at each target position, the small unit that came from the large unit S keeps there, else NEW."""
    inverse = {large: small for small, large in enumerate(small_from_large) if large != NEW}
    return [inverse.get(u, NEW) if u != NEW else NEW for u in large_map]


def lineage_of(small: Anchor, large: Anchor) -> Plan | None:
    """The index maps by which `small` was derived from `large`, if its cbd.json records them with `large`'s weights
    as the parent (a lineage from another model would fit the shapes and still align the wrong units)."""
    record = small.provenance.get("lineage")
    if not record or sorted(record.get("parent_sha256", {}).values()) != sorted(folder_hashes(large.path).values()):
        return None
    try:
        plan = Plan.from_dict(record["plan"])
        plan.validate(large.shape, small.shape)
    except (KeyError, TypeError, ShapeError):
        return None
    return plan


def plan_pair(small: Anchor, large: Anchor, target: Shape, importance_of: Callable[[Anchor, Shape], Importance],
              grow: str = "zero", align: str = "auto") -> tuple[Plan, Plan, dict]:
    """Plans for E(small) and S(large), aligned unit by unit.

    With lineage (small cut from large), S keeps the units small came from, topped up by importance (by order when
    small is a nested slice of large: the first units), and E places its units at those same positions; otherwise S
    keeps by importance and E's units are matched to S's by weight similarity (alignment.py), layers by relative
    depth. `align="none"` keeps both anchors' own unit order,
    as a linear merge of two models of one shape does.
    """
    lineage = lineage_of(small, large) if align in ("auto", "lineage") else None
    if align == "lineage" and lineage is None:
        raise ValueError(f"align 'lineage': {small.path} records no lineage from {large.path} in its cbd.json")
    sliced = lineage is not None and is_nested_slice(small)  # S is then the first units: the widths trained
    large_importance = importance_of(large, target) if _shrinks(large.shape, target) and not sliced else None
    plan_s = build_plan(large.shape, target, large_importance, grow, lineage)
    importance = large_importance.kind if large_importance else None
    if align == "none":
        return plan_single(small, target, importance_of, grow), plan_s, {"method": "none", "importance": importance}
    if lineage is None:
        assignments = Assignments()
        plan_e = align_to(small, large, plan_s, target, grow, assignments)
        return plan_e, plan_s, {"method": "hungarian", "importance": importance, "assignments": assignments.made,
                                "solved": assignments.solved}
    small_of_large_layer = {layer.source: k for k, layer in enumerate(lineage.layers) if not layer.fresh}
    layer_sources = [small_of_large_layer.get(s.source, NEW) if not s.fresh else NEW for s in plan_s.layers]
    placed = fill_fresh_sources(layer_sources)
    unit_maps = {}
    for (small_layer, fresh), large_layer in zip(placed, plan_s.layers, strict=True):
        if not fresh:
            cut = lineage.layers[small_layer]
            unit_maps[small_layer] = (_placed(large_layer.heads, cut.heads),
                                      _placed(large_layer.kv_heads, cut.kv_heads), _placed(large_layer.ffn, cut.ffn))
    layers = layers_with_copies(placed, unit_maps, grow)
    plan_e = Plan(_placed(plan_s.residual, lineage.residual), layers)
    plan_e.validate(small.shape, target)
    return plan_e, plan_s, {"method": "lineage", "importance": importance, **({"nested": True} if sliced else {})}


def is_nested_slice(small: Anchor) -> bool:
    """Whether `small` is its parent's first units, written by nested training (distillation/nested.py): then every
    size between the two is the parent's first units too, whatever the mix."""
    return bool(small.provenance.get("nested"))


