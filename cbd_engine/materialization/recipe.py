"""Materialize a model of any size from one or two anchors (paper section 3.4):

    theta = alpha * E(small) + (1 - alpha) * S(large)

E expands the smaller anchor, S subsets the larger, both to the target shape and aligned unit by unit, and the mix
(`mix`: per unit by default, or the paper's Eq. 3; mixing.py) is streamed tensor by tensor from the anchors'
safetensors into the output's. The recipe, top to bottom:
load anchors -> resolve the target shape -> calibration -> importance and alignment (plan E and S) -> choose alpha
(on the calibration's dev rows, alpha_search.py) -> stream tensors -> write the folder with its provenance.

Nothing is pruned by weight magnitude unless `importance="magnitude"` is asked for by name: without a calibration,
the anchors' own calibration.json or the package's default set is read (cbd_engine.data.calibration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cbd_engine import __version__
from cbd_engine.data.calibration import Calibration, CalibrationInput, resolve_calibration
from cbd_engine.io.cache import cache_dir
from cbd_engine.io.checkpoint import (
    DTYPE_NAMES,
    parse_dtype,
)
from cbd_engine.materialization.alpha_search import (
    KNOTS,
    AlphaChoice,
    Candidates,
    anchor_dev_loss,
    knots_key,
    search_alpha,
    search_by_knots,
)
from cbd_engine.materialization.anchor import Anchor, Term
from cbd_engine.materialization.baselines import BASELINES, materialize_baseline
from cbd_engine.materialization.mixing import Pair, tensor_group, uniform
from cbd_engine.materialization.planning import ImportanceSource, plan_pair, plan_single
from cbd_engine.materialization.stream import MaterializeResult, iter_tensors, lineage_record, term_record, write_model
from cbd_engine.materialization.transforms import (
    check_architecture_match,
    grown_eps,
)
from cbd_engine.nn.loading import has_tokenizer
from cbd_engine.spec.families import TensorSpec
from cbd_engine.spec.options import (
    ALIGNMENTS,
    ALPHA_MODES,
    ALPHA_SEARCHES,
    GROWS,
    IMPORTANCES,
    INITS,
    MIXES,
    REFINE_STEPS,
)
from cbd_engine.spec.progress import ProgressCallback, no_progress
from cbd_engine.spec.shapes import (
    PRUNE_ORDER,
    Shape,
    ShapeError,
    check_same_chain,
    parse_size,
    solve_derived_shape,
    solve_shape,
)

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
    alpha_search: str = "knots",
    dtype: str = "bfloat16",
    seed: int = 0,
    grow: str = "zero",
    align: str = "auto",
    progress: ProgressCallback = no_progress,
    should_stop: Callable[[], bool] | None = None,
    max_shard_bytes: int | None = None,
    quality: bool = False,
) -> MaterializeResult:
    """Write a Hugging Face folder of the requested size or shape at `out` (atomically; nothing on error).

    alpha: "auto" (also None), "proportional" (by parameter count), or a number in [0, 1], the smaller anchor's
    weight. alpha_search: how "auto" finds it, "knots" (interpolated between the pair's cached grids: no dev pass
    once they exist) or "exact" (the grid at this size: 7 dev passes); alpha_search.py.
    A pair whose smaller anchor is a nested slice of the larger (nested training, distillation/nested.py) gives the
    larger anchor's first units at the target, whatever alpha and mix: alpha is 0 and nothing is searched.
    calibration: a file, texts, or a Calibration; None reads the anchors' own, else the package default.
    quality: with a given alpha (or "auto" by knots), also score the model and alpha 0 on the dev rows (two forward
    passes: about 25 s for SmolLM2-135M on a 2-core CPU, ten times the merge itself); "auto" by a grid at this size
    has those scores from it."""
    _check_options(init, align, grow, mix, importance, alpha, alpha_search)
    out_dtype = parse_dtype(dtype)
    anchors = _load_anchors(small, large)
    target = resolve_target(anchors, size, shape, prune_order)
    if init in BASELINES:
        return materialize_baseline(out, init, anchors[-1], target, seed, out_dtype, progress, should_stop)
    calib = resolve_calibration(calibration, [a.path for a in anchors])
    importance_of = ImportanceSource(calib, importance, progress)
    small_anchor, large_anchor = anchors[0], anchors[-1]
    record = _provenance(init, anchors, target, seed, out_dtype, grow, importance_of)
    if init == "single" or len(anchors) == 1:  # expand (or subset) one anchor
        term = Term(small_anchor, plan_single(small_anchor, target, importance_of, grow))
        eps = grown_eps(small_anchor.spec.eps, term.plan, target)
        record.update(alpha=None, terms=[term_record(term, "anchor")], lineage=lineage_record(term))
        tensors = iter_tensors(lambda spec, name, layer, rows: term.tensor(spec, name, layer, seed, rows), target,
                               small_anchor)
        return write_model(out, large_anchor.spec.config_for(target, eps=eps), large_anchor, tensors, target, out_dtype,
                      record, progress, should_stop, max_shard_bytes)

    def pair_at(shape: Shape) -> tuple[Pair, dict]:
        plan_e, plan_s, alignment = plan_pair(small_anchor, large_anchor, shape, importance_of, grow, align)
        return Pair(Term(small_anchor, plan_e), Term(large_anchor, plan_s), mix), alignment

    pair, alignment = pair_at(target)
    requested = alpha
    if alignment.get("nested"):  # the smaller anchor is the larger's first units: every alpha writes these weights
        alpha = 0.0
    options = {"mix": mix, "grow": grow, "align": align, "importance": importance_of.describe(), "seed": seed}
    knots = Knots(lambda shape: pair_at(shape)[0], knots_key(small_anchor, large_anchor, calib, options)) \
        if alpha in (None, "auto") and alpha_search == "knots" and not refine_steps else None
    choice = choose_alpha(alpha, pair, target, calib, seed, refine_steps, progress, knots)
    scored = None
    if choice.grid or quality:
        choice, scored = _quality(choice, pair, target, calib, seed)
    searched = choice.method == "knots" or choice.grid
    record.update(alpha=choice.alpha, alphas=choice.alphas, mix=mix, alignment=alignment,
                  alpha_search=choice.to_dict() if searched else {"requested": requested},
                  terms=[term_record(pair.small, "small"), term_record(pair.large, "large")],
                  interpolation_training=trained_path(small_anchor, alignment, mix), quality=scored)
    arch = large_anchor.spec.architecture

    def mixed(spec: TensorSpec, name: str, layer: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        return pair.tensor(spec, name, layer, seed, rows).at(choice.alphas[tensor_group(arch, spec)])

    config = large_anchor.spec.config_for(target, eps=pair.eps(choice.alphas, target))
    return write_model(out, config, large_anchor, iter_tensors(mixed, target, large_anchor), target, out_dtype, record,
                  progress, should_stop, max_shard_bytes)


def trained_path(small: Anchor, alignment: dict, mix: str) -> dict | None:
    """How the path between the anchors was trained while the smaller was distilled from the larger (the smaller
    anchor's cbd.json, distillation.interpolation), when the units align by that lineage; None when it was not.
    `matches_mix`: whether this model's mix is the one trained (line: the per-unit mix; nested: the slice, which
    every mix of a nested pair is)."""
    trained = (small.provenance.get("distillation") or {}).get("interpolation")
    if not trained or alignment.get("method") != "lineage":
        return None
    if trained["kind"] == "nested":
        return {"kind": "nested", "weight": trained["weight"], "slice": bool(alignment.get("nested")),
                "matches_mix": bool(alignment.get("nested"))}
    return {"kind": trained["kind"], "weight": trained["weight"], "points": trained["points"],
            "matches_mix": mix == "unit"}


def _check_options(init: str, align: str, grow: str, mix: str, importance: str, alpha: float | str | None,
                   alpha_search: str) -> None:
    for name, value, allowed in (("init", init, INITS), ("align", align, ALIGNMENTS), ("mix", mix, MIXES),
                                 ("importance", importance, IMPORTANCES), ("alpha_search", alpha_search,
                                                                           ALPHA_SEARCHES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if grow not in GROWS:
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


@dataclass
class Knots:
    """alpha "auto" by the pair's knots: a pair at any shape, and the knots' cache key (alpha_search.py)."""

    pair_at: Callable[[Shape], Pair]
    key: list


def choose_alpha(alpha: float | str | None, pair: Pair, target: Shape, calibration: Calibration, seed: int,
                 refine_steps: int, progress: ProgressCallback, knots: Knots | None = None) -> AlphaChoice:
    """"auto" (or None): by the pair's knots when given and the target is on the size rule's path between two
    anchors of different sizes, else the search at the target; "proportional": by parameter count; a number as
    it is."""
    if alpha is None or alpha == "auto":
        if not has_tokenizer(pair.large.anchor.path):
            raise ValueError(f"alpha 'auto' scores candidates on dev rows, and {pair.large.anchor.path} has no "
                             "tokenizer files: add them, or give alpha as a number")
        fraction = path_fraction(pair.small.anchor, pair.large.anchor, target)
        if knots is None or fraction is None:
            return search_alpha(pair, target, calibration, seed, refine_steps, progress)
        return search_by_knots(knots.pair_at, knot_shapes(pair.small.anchor, pair.large.anchor), fraction,
                               calibration, seed, knots.key, cache_dir() / "alpha-knots", progress)
    small, large = pair.small.anchor, pair.large.anchor
    value = proportional_alpha(small.params, large.params, large.spec.architecture.num_params(target)) \
        if alpha == "proportional" else float(alpha)
    return AlphaChoice(uniform(value), value, math.nan, {})


def path_fraction(small: Anchor, large: Anchor, target: Shape) -> float | None:
    """How far `target` is from the smaller anchor to the larger, in parameter count, when it is the size rule's
    shape for its count (solve_shape); None for a shape off that path or anchors of one size."""
    arch = large.spec.architecture
    params = arch.num_params(target)
    if large.params == small.params or solve_shape(arch, small.shape, large.shape, params) != target:
        return None
    return (params - small.params) / (large.params - small.params)


def knot_shapes(small: Anchor, large: Anchor) -> list[tuple[float, Shape, int]]:
    """(fraction, shape, parameters) of each knot between the anchors, by the size rule; the fraction is the shape's
    own (the rule's shapes are whole units: a knot lands near its nominal fraction)."""
    arch = large.spec.architecture
    gap = large.params - small.params
    shapes = [solve_shape(arch, small.shape, large.shape, round(small.params + f * gap)) for f in KNOTS]
    return [((arch.num_params(s) - small.params) / gap, s, arch.num_params(s)) for s in shapes]


def _quality(choice: AlphaChoice, pair: Pair, target: Shape, calibration: Calibration, seed: int
             ) -> tuple[AlphaChoice, dict]:
    """What a user sees of the model's quality before downloading it, on the dev rows: its loss against the larger
    anchor pruned to its size (alpha 0, the strongest simple baseline), the anchors' own, and uniform guessing. Not
    measured for anchors without a tokenizer (weights only). An alpha interpolated between knots that scores worse
    than alpha 0 here gives way to alpha 0 (the grid at this size would have picked it over its own candidate), so
    "auto", wherever it is scored, never hands out a model that loses to the baseline on the dev rows."""
    if not has_tokenizer(pair.large.anchor.path):
        return choice, {"skipped": "the larger anchor's folder has no tokenizer files"}
    if choice.grid:  # scored at this size by its grid
        dev_loss, alpha_0 = choice.dev_loss, choice.grid[0.0]
    else:  # a requested or interpolated alpha: score it and alpha 0 now
        candidates = Candidates(pair, target, seed, calibration)
        dev_loss = candidates.dev_loss(choice.alphas)
        # a model that is alpha 0 (asked for, or a nested slice) is its own baseline: one pass, not two
        alpha_0 = dev_loss if choice.alphas == uniform(0.0) else candidates.dev_loss(uniform(0.0))
        if choice.method == "knots" and dev_loss > alpha_0:
            choice = replace(choice, alpha=0.0, alphas=uniform(0.0),
                             fallback={"alpha": choice.alpha, "dev_loss": dev_loss})
            dev_loss = alpha_0
        if choice.method == "knots":
            choice = replace(choice, dev_loss=dev_loss)
    cache = cache_dir() / "dev-loss"
    uniform_loss = math.log(target.vocab_size)
    return choice, {
        "dev_loss": dev_loss, "alpha_0_dev_loss": alpha_0, "uniform_loss": uniform_loss,
        "anchors_dev_loss": {role: anchor_dev_loss(term.anchor, calibration, cache, pair.large.anchor.path)
                             for role, term in (("small", pair.small), ("large", pair.large))},
        "worse_than_alpha_0": dev_loss > alpha_0, "worse_than_uniform": dev_loss > uniform_loss,
        "dev_rows": len(calibration.dev_rows) + len(calibration.dev_texts)}


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
