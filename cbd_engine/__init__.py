"""CBD engine: a pure library (no web, no database), in layers that each import only the ones before them
(docs/ARCHITECTURE.md; enforced by the import-linter contract in pyproject.toml):

    spec -> io -> data -> nn -> materialization | evaluation -> distillation -> pipelines

The public entry points are importable from here; they load lazily, so `import cbd_engine` stays torch-free."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"  # 0.2: unit mix, alpha auto by default, calibration everywhere, dev split

_PUBLIC = {
    "Shape": "cbd_engine.spec.shapes", "ShapeError": "cbd_engine.spec.shapes", "parse_size": "cbd_engine.spec.shapes",
    "solve_shape": "cbd_engine.spec.shapes", "ModelSpec": "cbd_engine.spec.families",
    "DistillConfig": "cbd_engine.spec.distill_config", "parse_spec": "cbd_engine.spec.chain",
    "estimate_chain_seconds": "cbd_engine.spec.estimate", "ProgressEvent": "cbd_engine.spec.progress",
    "Cancelled": "cbd_engine.spec.progress", "import_gguf": "cbd_engine.io.gguf",
    "resolve_source": "cbd_engine.io.sources", "Calibration": "cbd_engine.data.calibration",
    "materialize": "cbd_engine.materialization.recipe", "MaterializeResult": "cbd_engine.materialization.recipe",
    "evaluate": "cbd_engine.evaluation", "distill": "cbd_engine.distillation.recipe",
    "train": "cbd_engine.distillation.train", "build_chain": "cbd_engine.pipelines.chain",
    "read_chain": "cbd_engine.pipelines.chain", "heal": "cbd_engine.pipelines.heal",
    "plan_experiment": "cbd_engine.pipelines.experiment", "run_experiment": "cbd_engine.pipelines.experiment",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cbd_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
