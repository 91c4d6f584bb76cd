"""The baselines that need a fresh initialization (spec/options.py INITS): random, and LearnGene (paper appendix I)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from cbd_engine import __version__
from cbd_engine.io.checkpoint import (
    DTYPE_NAMES,
)
from cbd_engine.materialization.anchor import Anchor
from cbd_engine.materialization.stream import MaterializeResult, write_model
from cbd_engine.spec.progress import ProgressCallback
from cbd_engine.spec.shapes import (
    Shape,
)

LEARNGENE_LAYERS = 3
# The baselines made from a fresh initialization (spec/options.py INITS; "cbd" and "single" are the materializer's
# own), by the layers of the larger anchor each inherits: none, its first three, its last three (paper appendix I).
BASELINES: dict[str, str | None] = {"random": None, "learngene_auto": "first", "learngene_van": "last"}


def learngene_shape(large: Anchor, params: int) -> Shape:
    """LearnGene keeps the anchor's width and changes depth only: the depth (at least the three inherited layers)
    whose parameter count is closest to `params`."""
    arch = large.spec.architecture
    depths = range(LEARNGENE_LAYERS, 2 * large.shape.num_layers + 1)
    return min((replace(large.shape, num_layers=depth) for depth in depths),
               key=lambda shape: abs(arch.num_params(shape) - params))


def materialize_baseline(out: str | Path, init: str, large: Anchor, target: Shape, seed: int, dtype: torch.dtype,
                          progress: ProgressCallback, should_stop: Callable[[], bool] | None) -> MaterializeResult:
    """random: the target shape with the family's standard init. learngene_auto / learngene_van (paper appendix I):
    the first / last three layers of the larger anchor at its own width, random layers after / before them up to
    the depth whose size is closest to the target's; embeddings and final norm from the anchor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, inherits = large.spec.architecture, BASELINES[init]
    if inherits is not None:
        target = learngene_shape(large, arch.num_params(target))
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**large.spec.config_for(target))
    model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if inherits is not None:
        depth, count = target.num_layers, LEARNGENE_LAYERS
        copied = range(count) if inherits == "first" else range(depth - count, depth)
        source_of = {j: (j if inherits == "first" else large.shape.num_layers - depth + j) for j in copied}
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
    return write_model(out, large.spec.config_for(target), large, tensors, target, dtype, provenance, progress,
                  should_stop, None)
