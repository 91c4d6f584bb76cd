"""Heal steps: a materialized model distilled from the larger anchor for a few steps on the chain's data.

Optional: materialization stays teacher-free and takes seconds; healing loads the larger anchor as a teacher and
costs K distillation steps (docs/RESULTS.md measures K = 30 on this CPU for auto alpha and alpha 0). It is one
distillation stage (distillation/recipe.py): resumable from its checkpoints, cancellable, its dev rows pick between the
model as materialized and as healed, and its metrics report the validation loss before and after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cbd_engine.data.calibration import DEFAULT_SET
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import ProgressCallback, no_progress


def heal_config(config: DistillConfig, steps: int, learning_rate: float | None = None) -> DistillConfig:
    """The chain's distillation settings for `steps` heal steps: the dev rows pick between the model before and
    after only (no evaluation in between), checkpoints about every fifth of the run for resuming."""
    if steps < 1:
        raise ValueError(f"heal steps must be at least 1, got {steps}")
    every = max(10, steps // 5)
    if config.mode == "minillm":  # its checkpoints fall between batches of rollouts
        every = math.ceil(every / config.ppo_epochs) * config.ppo_epochs
    return replace(config, steps=steps, learning_rate=learning_rate or config.learning_rate, eval_every=0,
                   checkpoint_every=every if steps > every else 0)


def heal(model_dir: str | Path, teacher_dir: str | Path, out: str | Path, steps: int, *,
         dataset: dict | None = None, learning_rate: float | None = None, config: DistillConfig | None = None,
         work_dir: str | Path | None = None, resume: bool = False, progress: ProgressCallback = no_progress,
         should_stop: Callable[[], bool] | None = None):
    """Distill `model_dir` from `teacher_dir` for `steps` steps into `out`. `dataset` is a POST /chains dataset
    object (the chain's; default: the package's calibration set); `config` the chain's distillation settings."""
    from cbd_engine.distillation.recipe import distill
    from cbd_engine.pipelines.chain import ChainData

    config = heal_config(config or DistillConfig(), steps, learning_rate)
    data = ChainData.load(dataset or {"path": str(DEFAULT_SET)}, Path(model_dir), config)
    provenance = {"role": "heal", "teacher": str(teacher_dir), "steps": steps,
                  "data": (dataset or {}).get("path") or (dataset or {}).get("hf") or "default calibration set"}
    return distill(teacher_dir, model_dir, data.examples, out, config, work_dir=work_dir, resume=resume,
                   stage="heal", provenance=provenance, progress=progress, should_stop=should_stop)
