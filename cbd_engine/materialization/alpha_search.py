"""alpha "auto": the mix of two anchors with the lowest loss on the calibration's dev rows.

0. Knots (the default, `search_by_knots`): the grid below runs once per pair of anchors, at three sizes between
   them (KNOTS: a quarter, half and three quarters of the way in parameter count, on the size rule's path), and is
   cached with the anchors' weights and the calibration; a size between knots takes the alpha interpolated
   linearly (in parameter count) between the neighbouring knots' best, with the anchors' own ends (alpha 1 at the
   smaller anchor's size is the smaller anchor itself, alpha 0 at the larger's the larger). So a chain's
   materializations pay each knot's 7 dev passes once (about a minute per 100M knot on a 2-core CPU; a size reads
   only the one or two knots beside it, so the first model pays for at most two) and then none: a forward pass per
   candidate cost ten 135M materializations here (docs/BENCHMARKS.md, "Auto alpha").
   Why it is enough: the best alpha moves smoothly with size, from 1 near the smaller anchor to 0 near the larger
   (docs/RESULTS.md, Figure 6 analogue), and the loss is flat near its best; bench/alpha_search.py measures the
   interpolated choice against the search at the size itself. A shape off the size rule's path (a given shape,
   rounded widths), an equal-size merge, per-module refinement, or `alpha_search="exact"` run the grid at the
   target itself (below).
1. Grid: alpha in {0, 0.25, 0.5, 0.75, 1}, then the two midpoints beside the best (resolution 0.125). The ends are
   candidates: alpha 0 is the larger anchor pruned to the size, the strongest simple baseline, so "auto" never
   hands out a model that loses to it on the dev rows.
2. Per-module refinement (`refine_steps` > 0): one alpha per group (attention, MLP, embeddings and norms; mixing.GROUPS)
   fitted by Adam from the grid's best on the calibration's training texts (language-modeling loss), kept only if
   its dev loss beats the grid's best.

Every candidate is `PairTensor.at(alpha)` per tensor, built from the pair's tensors held once in memory:
memory is about three times the target model in float32 (base, other, and the scoring model), plus masks.
Scoring uses the dev rows only (the contract's 1 mod 10), never validation rows. Each anchor's own dev loss is
cached with the anchor's weights (`anchor_dev_loss`), so a chain's materializations pay for it once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cbd_engine.data.batches import Example, encode_rows, pad_id_of
from cbd_engine.data.calibration import Calibration
from cbd_engine.io.cache import cached_json
from cbd_engine.io.checkpoint import folder_hashes
from cbd_engine.materialization.anchor import Anchor
from cbd_engine.materialization.mixing import Alphas, Pair, PairTensor, tensor_group, uniform
from cbd_engine.spec.options import GROUPS
from cbd_engine.spec.progress import ProgressCallback, StageTimer, no_progress
from cbd_engine.spec.shapes import Shape

COARSE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
STEP = 0.125  # the refinement around the coarse grid's best
DEV_MAX_LENGTH = 256
REFINE_BATCH = 4
REFINE_LR = 0.05
KNOTS = (0.25, 0.5, 0.75)  # where between the anchors (fraction of the parameter gap) a pair's grid runs once


@dataclass
class AlphaChoice:
    alphas: Alphas  # per group, what the model is made with
    alpha: float  # the grid's best, or the knots' interpolation (the one number the API reports)
    dev_loss: float | None  # of the model made with `alphas`; None when interpolated (not scored at this size)
    grid: dict[float, float]  # alpha -> dev loss, at this size
    refined: dict = field(default_factory=dict)  # the per-module fit: alphas, dev loss, kept
    dev_rows: int = 0
    seconds: float = 0.0
    method: str = "grid"  # "grid" (at this size) or "knots" (interpolated between the pair's knots)
    knots: list[dict] = field(default_factory=list)  # per knot: fraction, params, alpha, dev_loss, grid
    fallback: dict = field(default_factory=dict)  # knots: the interpolated alpha that lost to alpha 0 when scored

    def to_dict(self) -> dict:
        record = asdict(self)
        record["grid"] = {f"{alpha:g}": loss for alpha, loss in sorted(self.grid.items())}
        return record


def dev_examples(tokenizer, calibration: Calibration, max_length: int = DEV_MAX_LENGTH) -> list[Example]:
    """The calibration's dev items: instruction rows score their response tokens, texts every token."""
    examples = encode_rows(tokenizer, list(calibration.dev_rows), calibration.prompt_format, max_length)
    examples += text_examples(tokenizer, calibration.dev_texts, max_length)
    if not examples:
        raise ValueError(f"calibration {calibration.source} has no dev rows to score candidates on")
    return examples


def text_examples(tokenizer, texts: tuple[str, ...], max_length: int = DEV_MAX_LENGTH) -> list[Example]:
    """Texts as examples whose every token is scored."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]
    return [Example(row, list(row), 0) for row in ids if len(row) > 1]


def anchor_dev_loss(anchor: Anchor, calibration: Calibration, cache_dir: Path, tokenizer_dir: Path) -> float:
    """The anchor's own loss on the calibration's dev items, cached with its weights' sha256. The tokenizer is the
    chain's (one vocabulary): an anchor from a bare checkpoint may carry none."""
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import examples_loss

    def compute() -> float:
        tokenizer = load_tokenizer(tokenizer_dir)
        model = load_model(anchor.path)
        return examples_loss(model, dev_examples(tokenizer, calibration), pad_id_of(tokenizer))

    key = [folder_hashes(anchor.path), [r.to_dict() for r in calibration.dev_rows], list(calibration.dev_texts),
           calibration.prompt_format, DEV_MAX_LENGTH]
    return cached_json(cache_dir, "dev-loss", key, compute)


class Candidates:
    """The pair's tensors in memory and a model of the target shape to score any alphas with."""

    def __init__(self, pair: Pair, target: Shape, seed: int, calibration: Calibration):
        from transformers import AutoConfig, AutoModelForCausalLM

        from cbd_engine.nn.loading import load_tokenizer

        large = pair.large.anchor
        arch = large.spec.architecture
        self.pair, self.target = pair, target
        self.tensors: dict[str, PairTensor] = {}
        self.groups: dict[str, str] = {}
        for name, spec, layer_index in arch.tensor_names(target):
            self.tensors[name] = pair.tensor(spec, name, layer_index, seed)
            self.groups[name] = tensor_group(arch, spec)
        config = AutoConfig.for_model(**large.spec.config_for(target, eps=pair.eps(uniform(0.0), target)))
        self.model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(large.path)
        self.pad_id = pad_id_of(self.tokenizer)
        self.dev = dev_examples(self.tokenizer, calibration)
        self.calibration = calibration

    def load(self, alphas: Alphas) -> None:
        state = {name: t.at(alphas[self.groups[name]]) for name, t in self.tensors.items()}
        self.model.load_state_dict(state, strict=False)
        if self.target.tie_word_embeddings:
            self.model.tie_weights()
        _set_eps(self.model, self.pair.eps(alphas, self.target))

    def dev_loss(self, alphas: Alphas) -> float:
        from cbd_engine.nn.validation import examples_loss

        self.load(alphas)
        return examples_loss(self.model, self.dev, self.pad_id)


def _set_eps(model: torch.nn.Module, eps: float) -> None:
    """The residual norms' epsilon (the pair's mix of the anchors'), on the modules built with the config's."""
    for module in model.modules():
        for attribute in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, eps)


def search_alpha(pair: Pair, target: Shape, calibration: Calibration, seed: int = 0, refine_steps: int = 0,
                 progress: ProgressCallback = no_progress) -> AlphaChoice:
    """The grid (then, with refine_steps, the per-module fit) on the calibration's dev items; see the module
    docstring."""
    started = time.monotonic()
    timer = StageTimer("alpha search", len(COARSE_GRID) + 2 + (1 if refine_steps else 0), progress)
    timer.update(0)
    candidates = Candidates(pair, target, seed, calibration)
    grid: dict[float, float] = {}

    def score(alpha: float) -> None:
        if alpha not in grid and 0.0 <= alpha <= 1.0:
            grid[alpha] = candidates.dev_loss(uniform(alpha))
        timer.update(len(grid))

    for alpha in COARSE_GRID:
        score(alpha)
    coarse_best = min(grid, key=lambda a: (grid[a], a))
    for alpha in (coarse_best - STEP, coarse_best + STEP):
        score(alpha)
    best = min(grid, key=lambda a: (grid[a], a))
    choice = AlphaChoice(uniform(best), best, grid[best], grid, dev_rows=len(candidates.dev))
    if refine_steps:
        fitted = _fit_groups(candidates, best, refine_steps)
        dev_loss = candidates.dev_loss(fitted)
        kept = dev_loss < choice.dev_loss
        choice.refined = {"alphas": fitted, "dev_loss": dev_loss, "steps": refine_steps, "kept": kept}
        if kept:
            choice.alphas, choice.dev_loss = fitted, dev_loss
        timer.update(timer.total)
    choice.seconds = round(time.monotonic() - started, 2)
    return choice


def search_by_knots(pair_at: Callable[[Shape], Pair], knots: list[tuple[float, Shape, int]], fraction: float,
                    calibration: Calibration, seed: int, key: list, cache: Path,
                    progress: ProgressCallback = no_progress) -> AlphaChoice:
    """The alpha at `fraction` of the way from the smaller anchor to the larger (in parameter count), interpolated
    between the knots' grids (each cached under `key` and its shape; computed on a miss with `pair_at(shape)`);
    see the module docstring. knots: (fraction, shape, params) for each of KNOTS."""
    started = time.monotonic()
    records = []
    for knot_fraction, shape, params in bracketing(knots, fraction):
        def compute(shape: Shape = shape) -> dict:
            return search_alpha(pair_at(shape), shape, calibration, seed, 0, progress).to_dict()

        found = cached_json(cache, "alpha-knot", [*key, shape.to_dict(), COARSE_GRID, STEP], compute)
        records.append({"fraction": knot_fraction, "params": params, "alpha": found["alpha"],
                        "dev_loss": found["dev_loss"], "grid": found["grid"], "seconds": found["seconds"]})
    alpha = interpolate_alpha([(r["fraction"], r["alpha"]) for r in records], fraction)
    return AlphaChoice(uniform(alpha), alpha, None, {}, dev_rows=len(calibration.dev_rows) + len(
        calibration.dev_texts), seconds=round(time.monotonic() - started, 2), method="knots", knots=records)


def bracketing(knots: list[tuple[float, Shape, int]], fraction: float) -> list[tuple[float, Shape, int]]:
    """The knots the interpolation at `fraction` reads: the nearest at or below it and at or above it (one where it
    is a knot or lies beyond the last); a pair's first model pays for these grids only (7 or 14 dev passes)."""
    below = [k for k in knots if k[0] <= fraction][-1:]
    above = [k for k in knots if k[0] >= fraction][:1]
    return below + [k for k in above if k not in below]


def interpolate_alpha(knots: list[tuple[float, float]], fraction: float) -> float:
    """Linear between (fraction, best alpha) points, through the anchors' own ends: (0, 1) is the smaller anchor,
    (1, 0) the larger."""
    xs, ys = zip(*[(0.0, 1.0), *sorted(knots), (1.0, 0.0)], strict=True)
    return round(float(np.interp(fraction, xs, ys)), 4)


def knots_key(small: Anchor, large: Anchor, calibration: Calibration, options: dict) -> list:
    """What a knot's grid is a pure function of, besides its shape: both anchors' weights, the calibration (dev
    rows score it; its training rows rank units for the plans) and the materialization's options."""
    digest = hashlib.sha256(json.dumps(calibration.to_json(), sort_keys=True).encode()).hexdigest()
    return [folder_hashes(small.path), folder_hashes(large.path), digest, options, DEV_MAX_LENGTH]


def _fit_groups(candidates: Candidates, start: float, steps: int) -> Alphas:
    """One alpha per group, by Adam on the language-modeling loss of the calibration's training texts; the mix is
    differentiable in alpha (a weighted sum), so each step is one forward and backward of the target model."""
    from torch.func import functional_call

    from cbd_engine.data.batches import collate

    texts = text_examples(candidates.tokenizer, candidates.calibration.importance)
    alphas = torch.full((len(GROUPS),), start, requires_grad=True)
    optimizer = torch.optim.Adam([alphas], lr=REFINE_LR)
    index = {group: i for i, group in enumerate(GROUPS)}
    model = candidates.model
    for step in range(steps):
        start = (step * REFINE_BATCH) % max(len(texts) - REFINE_BATCH + 1, 1)
        batch = collate(texts[start : start + REFINE_BATCH], candidates.pad_id)
        params = {}
        for name, t in candidates.tensors.items():
            blend = t.base + alphas[index[candidates.groups[name]]] * (t.other - t.base)
            params[name] = blend if t.mixed is None else torch.where(t.mixed, blend, t.base)
        # a tied output layer follows the embedding: functional_call keeps the model's ties (tie_weights=True)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
        loss = functional_call(model, params, args=(), kwargs=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            alphas.clamp_(0.0, 1.0)
    return {group: round(float(alphas[i].detach()), 4) for group, i in index.items()}

