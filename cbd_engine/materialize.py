"""Materialize a model of any size from one or two anchors (paper section 3.4):

    theta = alpha * E(small) + (1 - alpha) * S(large)

E expands the smaller anchor, S subsets the larger, both to the target shape and aligned unit by unit, and the mix
(`mix`: per unit by default, or the paper's Eq. 3; cbd_engine.mixing) is streamed tensor by tensor from the anchors'
safetensors into the output's. The recipe, top to bottom:
load anchors -> resolve the target shape -> calibration -> importance and alignment (plan E and S) -> choose alpha
(on the calibration's dev rows, cbd_engine.alpha_search) -> stream tensors -> write the folder with its provenance.

Nothing is pruned by weight magnitude unless `importance="magnitude"` is asked for by name: without a calibration,
the anchors' own calibration.json or the package's default set is read (cbd_engine.calibration).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cbd_engine import __version__
from cbd_engine.alignment import align_to
from cbd_engine.alpha_search import AlphaChoice, Candidates, anchor_dev_loss, search_alpha
from cbd_engine.anchor import Anchor, Term
from cbd_engine.calibration import Calibration, CalibrationInput, resolve_calibration
from cbd_engine.checkpoint import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    FileInfo,
    StreamingWriter,
    atomic_output_dir,
    copy_side_files,
    file_info,
    folder_hashes,
    parse_dtype,
)
from cbd_engine.families import POSITIONS, VOCAB, TensorSpec
from cbd_engine.importance import Importance, cached_activation_importance, magnitude_importance
from cbd_engine.mixing import Pair, tensor_group, uniform
from cbd_engine.options import ALIGNMENTS, ALPHA_MODES, IMPORTANCES, INITS, MIXES, REFINE_STEPS
from cbd_engine.progress import Cancelled, ProgressCallback, StageTimer, no_progress
from cbd_engine.shapes import (
    PRUNE_ORDER,
    Shape,
    ShapeError,
    check_same_chain,
    parse_size,
    solve_derived_shape,
    solve_shape,
)
from cbd_engine.transforms import (
    NEW,
    LayerMap,
    Plan,
    check_architecture_match,
    fill_fresh_sources,
    grown_eps,
    layers_with_copies,
    select_heads,
    select_layers,
    select_units,
)
from cbd_engine.zoo import cache_dir

LEARNGENE_LAYERS = 3
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


# ---------------------------------------------------------------- the recipe


def materialize(
    out: str | Path,
    *,
    small: str | Path | None = None,
    large: str | Path | None = None,
    size: int | str | None = None,
    shape: Shape | dict | None = None,
    alpha: float | str | None = "auto",
    mix: str = "unit",
    init: str = "cbd",
    calibration: CalibrationInput = None,
    importance: str = "activation",
    prune_order: str = PRUNE_ORDER,
    refine_steps: int = REFINE_STEPS,
    dtype: str = "bfloat16",
    seed: int = 0,
    grow: str = "zero",
    align: str = "auto",
    progress: ProgressCallback = no_progress,
    should_stop: Callable[[], bool] | None = None,
    max_shard_bytes: int | None = None,
) -> MaterializeResult:
    """Write a Hugging Face folder of the requested size or shape at `out` (atomically; nothing on error).

    alpha: "auto" (also None), "proportional" (by parameter count), or a number in [0, 1], the smaller anchor's
    weight. calibration: a file, texts, or a Calibration; None reads the anchors' own, else the package default."""
    _check_options(init, align, grow, mix, importance, alpha)
    out_dtype = parse_dtype(dtype)
    anchors = _load_anchors(small, large)
    target = resolve_target(anchors, size, shape, prune_order)
    if init in ("random", "learngene_auto", "learngene_van"):
        return _materialize_baseline(out, init, anchors[-1], target, seed, out_dtype, progress, should_stop)
    calib = resolve_calibration(calibration, [a.path for a in anchors])
    importance_of = ImportanceSource(calib, importance, progress)
    small_anchor, large_anchor = anchors[0], anchors[-1]
    record = _provenance(init, anchors, target, seed, out_dtype, grow, importance_of)
    if init == "single" or len(anchors) == 1:  # expand (or subset) one anchor
        term = Term(small_anchor, _plan_single(small_anchor, target, importance_of, grow))
        eps = grown_eps(small_anchor.spec.eps, term.plan, target)
        record.update(alpha=None, terms=[_term_record(term, "anchor")], lineage=_lineage_record(term))
        tensors = iter_tensors(lambda spec, name, layer, rows: term.tensor(spec, name, layer, seed, rows), target,
                               small_anchor)
        return _write(out, large_anchor.spec.config_for(target, eps=eps), large_anchor, tensors, target, out_dtype,
                      record, progress, should_stop, max_shard_bytes)
    plan_e, plan_s, alignment = plan_pair(small_anchor, large_anchor, target, importance_of, grow, align)
    pair = Pair(Term(small_anchor, plan_e), Term(large_anchor, plan_s), mix)
    choice = choose_alpha(alpha, pair, target, calib, seed, refine_steps, progress)
    record.update(alpha=choice.alpha, alphas=choice.alphas, mix=mix, alignment=alignment,
                  alpha_search=choice.to_dict() if choice.grid else {"requested": alpha},
                  terms=[_term_record(pair.small, "small"), _term_record(pair.large, "large")],
                  quality=_quality(choice, pair, target, calib, seed))
    arch = large_anchor.spec.architecture

    def mixed(spec: TensorSpec, name: str, layer: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        return pair.tensor(spec, name, layer, seed, rows).at(choice.alphas[tensor_group(arch, spec)])

    config = large_anchor.spec.config_for(target, eps=pair.eps(choice.alphas, target))
    return _write(out, config, large_anchor, iter_tensors(mixed, target, large_anchor), target, out_dtype, record,
                  progress, should_stop, max_shard_bytes)


def _check_options(init: str, align: str, grow: str, mix: str, importance: str, alpha: float | str | None) -> None:
    for name, value, allowed in (("init", init, INITS), ("align", align, ALIGNMENTS), ("mix", mix, MIXES),
                                 ("importance", importance, IMPORTANCES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if grow not in ("zero", "replicate"):
        raise ValueError(f"grow must be 'zero' (function-preserving) or 'replicate', got {grow!r}")
    if alpha is None or alpha in ALPHA_MODES:
        return
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], 'auto' or 'proportional', got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {value}")


def _load_anchors(small: str | Path | None, large: str | Path | None) -> list[Anchor]:
    anchors = [Anchor.load(p) for p in (small, large) if p is not None]
    if not anchors:
        raise ValueError("give at least one anchor (--small and/or --large)")
    if len(anchors) == 2:
        a, b = anchors
        check_architecture_match(a.spec.architecture, b.spec.architecture)
        check_same_chain(a.shape, b.shape)
        if a.params > b.params:
            raise ShapeError(f"--small ({a.params} parameters) is larger than --large ({b.params})")
    return anchors


def resolve_target(anchors: list[Anchor], size: int | str | None, shape: Shape | dict | None,
                   prune_order: str = PRUNE_ORDER) -> Shape:
    """The target shape: given, or solved from a size between the anchors by the contract's one-fraction rule; with
    one anchor, cut from it in `prune_order` (shapes.solve_derived_shape: width only)."""
    if (size is None) == (shape is None):
        raise ValueError("give exactly one of size or shape")
    arch = anchors[-1].spec.architecture
    if shape is not None:
        target = shape if isinstance(shape, Shape) else Shape.from_dict(shape, chain=anchors[-1].shape)
        for anchor in anchors:
            check_same_chain(anchor.shape, target)
        arch.validate(target)
        return target
    params = parse_size(size)
    if len(anchors) == 2:
        return solve_shape(arch, anchors[0].shape, anchors[1].shape, params)
    if params > anchors[0].params * 1.03:
        raise ShapeError(
            f"size {params} is above the only anchor's {anchors[0].params}; give --small and --large, "
            "or a --shape to expand one anchor"
        )
    return solve_derived_shape(arch, anchors[0].shape, params, prune_order)


def proportional_alpha(p_small: int, p_large: int, p_target: int) -> float:
    """alpha = (P_large - P) / (P_large - P_small), the weight of the smaller anchor; 0.5 for equal anchors."""
    if p_large == p_small:
        return 0.5
    return min(1.0, max(0.0, (p_large - p_target) / (p_large - p_small)))


def choose_alpha(alpha: float | str | None, pair: Pair, target: Shape, calibration: Calibration, seed: int,
                 refine_steps: int, progress: ProgressCallback) -> AlphaChoice:
    """"auto" (or None): the search on the dev rows; "proportional": by parameter count; a number as it is."""
    if alpha is None or alpha == "auto":
        return search_alpha(pair, target, calibration, seed, refine_steps, progress)
    small, large = pair.small.anchor, pair.large.anchor
    value = proportional_alpha(small.params, large.params, large.spec.architecture.num_params(target)) \
        if alpha == "proportional" else float(alpha)
    return AlphaChoice(uniform(value), value, math.nan, {})


def _quality(choice: AlphaChoice, pair: Pair, target: Shape, calibration: Calibration, seed: int) -> dict:
    """What a user sees of the model's quality before downloading it, on the dev rows: its loss against the larger
    anchor pruned to its size (alpha 0, the strongest simple baseline), the anchors' own, and uniform guessing."""
    if choice.grid:
        dev_loss, alpha_0 = choice.dev_loss, choice.grid[0.0]
    else:  # a requested alpha: score it and alpha 0 now
        candidates = Candidates(pair, target, seed, calibration)
        dev_loss, alpha_0 = candidates.dev_loss(choice.alphas), candidates.dev_loss(uniform(0.0))
    cache = cache_dir() / "dev-loss"
    uniform_loss = math.log(target.vocab_size)
    return {"dev_loss": dev_loss, "alpha_0_dev_loss": alpha_0, "uniform_loss": uniform_loss,
            "anchors_dev_loss": {role: anchor_dev_loss(term.anchor, calibration, cache, pair.large.anchor.path)
                                 for role, term in (("small", pair.small), ("large", pair.large))},
            "worse_than_alpha_0": dev_loss > alpha_0, "worse_than_uniform": dev_loss > uniform_loss,
            "dev_rows": len(calibration.dev_rows) + len(calibration.dev_texts)}


# ---------------------------------------------------------------- planning


@dataclass
class ImportanceSource:
    """Importance of an anchor's units: activations on the calibration's training texts (cached per anchor and
    calibration), or weight magnitude when asked for by name."""

    calibration: Calibration
    kind: str = "activation"
    progress: ProgressCallback = no_progress

    def __call__(self, anchor: Anchor) -> Importance:
        if self.kind == "magnitude":
            return magnitude_importance(anchor.path, anchor.spec)
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


def _plan_single(anchor: Anchor, target: Shape, importance_of: Callable[[Anchor], Importance], grow: str) -> Plan:
    """One anchor to the target shape: importance decides what a shrinking axis keeps, growth appends new units."""
    importance = importance_of(anchor) if _shrinks(anchor.shape, target) else None
    return build_plan(anchor.shape, target, importance, grow=grow)


def build_plan(source: Shape, target: Shape, importance: Importance | None, grow: str = "zero",
               lineage: Plan | None = None) -> Plan:
    """Index maps for every axis. With `lineage` (how a smaller model was cut from this one), the units it came from
    are kept first and the rest topped up by importance."""
    imp = importance
    keep_layers = [layer.source for layer in lineage.layers if not layer.fresh] if lineage else []
    layer_sources = select_layers(source.num_layers, target.num_layers, imp.layers if imp else None, keep_layers)
    residual = select_units(source.hidden_size, target.hidden_size, imp.residual if imp else None,
                            lineage.residual if lineage else [])
    layers = []
    for source_layer, fresh in fill_fresh_sources(layer_sources):
        kept = _lineage_layer(lineage, source_layer) if lineage and not fresh else None
        heads, kv_heads = select_heads(source, target, imp.heads[source_layer] if imp else None,
                                       kept.heads if kept else [], kept.kv_heads if kept else [])
        ffn = select_units(source.intermediate_size, target.intermediate_size,
                           imp.ffn[source_layer] if imp else None, kept.ffn if kept else [])
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


def _lineage_of(small: Anchor, large: Anchor) -> Plan | None:
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


def plan_pair(small: Anchor, large: Anchor, target: Shape, importance_of: Callable[[Anchor], Importance],
              grow: str = "zero", align: str = "auto") -> tuple[Plan, Plan, dict]:
    """Plans for E(small) and S(large), aligned unit by unit.

    With lineage (small cut from large), S keeps the units small came from, topped up by importance, and E places
    its units at those same positions; otherwise S keeps by importance and E's units are matched to S's by weight
    similarity (cbd_engine.alignment), layers by relative depth. `align="none"` keeps both anchors' own unit order,
    as a linear merge of two models of one shape does.
    """
    lineage = _lineage_of(small, large) if align in ("auto", "lineage") else None
    if align == "lineage" and lineage is None:
        raise ValueError(f"align 'lineage': {small.path} records no lineage from {large.path} in its cbd.json")
    large_importance = importance_of(large) if _shrinks(large.shape, target) else None
    plan_s = build_plan(large.shape, target, large_importance, grow, lineage)
    importance = large_importance.kind if large_importance else None
    if align == "none":
        return _plan_single(small, target, importance_of, grow), plan_s, {"method": "none", "importance": importance}
    if lineage is None:
        plan_e = align_to(small, large, plan_s, target, grow)
        return plan_e, plan_s, {"method": "hungarian", "importance": importance}
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
    return plan_e, plan_s, {"method": "lineage", "importance": importance}


# ---------------------------------------------------------------- streaming the tensors


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


def _write(out: str | Path, config: dict, side_files_from: Anchor, tensors: TensorStream, target: Shape,
           dtype: torch.dtype, provenance: dict, progress: ProgressCallback, should_stop: Callable[[], bool] | None,
           max_shard_bytes: int | None) -> MaterializeResult:
    arch = side_files_from.spec.architecture
    layout = [(name, arch.tensor_shape(spec, target)) for name, spec, _ in arch.tensor_names(target)]
    timer = StageTimer("materialize", len(layout), progress)
    timer.update(0)
    config = {**config, "dtype": DTYPE_NAMES[dtype]}
    with atomic_output_dir(out) as tmp, _single_thread():
        writer = StreamingWriter(tmp, layout, dtype, max_shard_bytes or DEFAULT_SHARD_BYTES)
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
def _single_thread() -> Iterator[None]:
    """The streaming loop is memory-bound elementwise work on small tensors: one thread is as fast, and on a busy
    machine several threads spin-waiting on each other were measured 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _provenance(init: str, anchors: list[Anchor], target: Shape, seed: int, dtype: torch.dtype, grow: str,
                importance_of: ImportanceSource) -> dict:
    arch = anchors[-1].spec.architecture
    roles = ("small", "large") if len(anchors) == 2 else ("anchor",)
    return {
        "engine_version": __version__,
        "init": init,
        "family": arch.family,
        "shape": target.to_dict(),
        "params": arch.num_params(target),
        "seed": seed,
        "dtype": DTYPE_NAMES[dtype],
        "grow": grow,
        "importance": importance_of.describe(),
        "anchors": [{"role": role, **a.describe()} for role, a in zip(roles, anchors, strict=True)],
    }


def _term_record(term: Term, role: str) -> dict:
    return {"role": role, "anchor": str(term.anchor.path), "plan": term.plan.to_dict()}


def _lineage_record(term: Term) -> dict:
    """A pure transform of one anchor: later interpolation aligns with it through this record."""
    return {"parent": str(term.anchor.path), "parent_sha256": folder_hashes(term.anchor.path),
            "plan": term.plan.to_dict()}


# ---------------------------------------------------------------- baselines that need a fresh initialization


def learngene_shape(large: Anchor, params: int) -> Shape:
    """LearnGene keeps the anchor's width and changes depth only: the depth (at least the three inherited layers)
    whose parameter count is closest to `params`."""
    arch = large.spec.architecture
    depths = range(LEARNGENE_LAYERS, 2 * large.shape.num_layers + 1)
    return min((replace(large.shape, num_layers=depth) for depth in depths),
               key=lambda shape: abs(arch.num_params(shape) - params))


def _materialize_baseline(out: str | Path, init: str, large: Anchor, target: Shape, seed: int, dtype: torch.dtype,
                          progress: ProgressCallback, should_stop: Callable[[], bool] | None) -> MaterializeResult:
    """random: the target shape with the family's standard init. learngene_auto / learngene_van (paper appendix I):
    the first / last three layers of the larger anchor at its own width, random layers after / before them up to
    the depth whose size is closest to the target's; embeddings and final norm from the anchor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = large.spec.architecture
    if init != "random":
        target = learngene_shape(large, arch.num_params(target))
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**large.spec.config_for(target))
    model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if init != "random":
        depth, count = target.num_layers, LEARNGENE_LAYERS
        copied = range(count) if init == "learngene_auto" else range(depth - count, depth)
        source_of = {j: (j if init == "learngene_auto" else large.shape.num_layers - depth + j) for j in copied}
        for name, spec, layer in arch.tensor_names(target):
            if layer is None or layer in source_of:
                source = spec.name.format(layer=source_of[layer]) if layer is not None else name
                state[name] = large.reader.read(source).float()
    provenance = {
        "engine_version": __version__, "init": init, "family": arch.family, "shape": target.to_dict(),
        "params": arch.num_params(target), "alpha": None, "seed": seed, "dtype": DTYPE_NAMES[dtype],
        "anchors": [{"role": "large", **large.describe()}],
    }
    tensors = ((name, iter([state[name]])) for name, _, _ in arch.tensor_names(target))
    return _write(out, large.spec.config_for(target), large, tensors, target, dtype, provenance, progress,
                  should_stop, None)
