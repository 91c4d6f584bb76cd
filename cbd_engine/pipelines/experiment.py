"""`run_experiment(spec, out)`: a resumable grid that reproduces the paper's comparisons on one machine, with the
baselines the paper leaves out (docs/RESULTS.md).

The recipe, top to bottom:
  1. chains: each named chain spec (a POST /chains body) is built into out/chains/NAME (build_chain, resumable),
     the chain the grid interpolates first; right after it:
  2. models between two anchors of that chain, for every (variant, size): a variant is a set of materialize
     options (alpha, mix, init), so the defaults, alpha 0 (the larger anchor pruned to the size), alpha 1, the
     paper's Eq. 3 and the baselines of fresh initializations sit side by side; then the alpha sweep;
  3. heal: the models of step 2 (of the variants in `heal_variants`, all by default) distilled from the larger
     anchor for each K of `heal_steps` (K > 0);
  4. direct: the Minitron-style baseline, the chain's source pruned to each size (the interpolated models' very
     shape) and distilled from the source for the same number of student steps the chain spent;
  5. two_by_two: an anchor's two causes apart at equal steps: initialized from its predecessor anchor or from
     the source, taught by either;
  6. training: the runs of the training grid (a model id x a token budget) with `cbd train`;
  7. evaluation, once every chain is built: every model on the held-out rows (per-row losses kept, so any two
     models compare pair-wise) and the listed tasks, into out/evals/ID.json;
  8. report: results.csv, results.md (tables with paired intervals), plots, manifest.json.

Every unit writes its output atomically and is skipped when that output exists, so an interrupted run continues
where it stopped; `manifest.json` records the spec, versions, seeds, the commands and each unit's seconds.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cbd_engine.io.atomic import write_text_atomically
from cbd_engine.pipelines.experiment_grid import (
    VALIDATION,
    Grid,
    ModelUnit,
    plan_experiment,
    recorded_alpha,
)
from cbd_engine.spec.progress import ProgressCallback, no_progress


def run_experiment(spec: dict, out: str | Path, *, progress: ProgressCallback = no_progress,
                   command: list[str] | None = None, log: Callable[[str], None] = print) -> Grid:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = plan_experiment(spec, out)
    manifest = _manifest(out, spec, command)
    interpolated = (spec.get("interpolate") or {}).get("chain")
    chains = sorted(spec["chains"], key=lambda name: name != interpolated)  # the grid's own chain first
    makers = {"materialized": _materialize, "healed": _heal, "direct": _direct_distill, "cross": _cross,
              "trained": _train}
    for name in chains:
        _timed(manifest, f"chain {name}", lambda n=name: _build_chain(out, n, spec["chains"][n], progress), log)
        for kind, make in makers.items():  # models of this chain, in dependency order
            for unit in (u for u in grid.models if u.kind == kind and u.chain == name):
                _timed(manifest, f"{kind} {unit.id}", lambda u=unit, m=make: m(grid, u, progress), log)
    for unit in grid.models:
        _timed(manifest, f"evaluate {unit.id}", lambda u=unit: _evaluate(grid, u, progress), log)
    from cbd_engine.pipelines.experiment_report import write_report

    write_report(grid, _collect(grid))
    _save_manifest(out, manifest)
    return grid


def _timed(manifest: dict, label: str, work: Callable[[], bool], log: Callable[[str], None]) -> None:
    """Run one unit; it returns False when its output already existed (resumed), so its seconds stay recorded."""
    started = time.monotonic()
    if work():
        manifest["units"][label] = round(time.monotonic() - started, 1)
        log(f"{label}: {manifest['units'][label]} s")
        _save_manifest(Path(manifest["out"]), manifest)


def _build_chain(out: Path, name: str, chain_spec: dict, progress: ProgressCallback) -> bool:
    from cbd_engine.pipelines.chain import build_chain

    folder = out / "chains" / name
    expected = len(chain_spec["anchors"])
    if (folder / f"anchor-{expected:02d}" / "metrics.json").is_file():
        return False
    build_chain(chain_spec, folder, resume=True, progress=progress)
    return True


def _anchor(grid: Grid, chain: str, index: int) -> Path:
    return grid.out / "chains" / chain / f"anchor-{index:02d}"


def _pair(grid: Grid, chain: str) -> tuple[Path, Path]:
    small, large = grid.spec["interpolate"].get("between", [1, 2])[::-1]
    return _anchor(grid, chain, small), _anchor(grid, chain, large)


def _materialize(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.materialization.recipe import materialize

    if (unit.path / "config.json").is_file():
        return False
    settings = grid.spec["interpolate"]
    small, large = _pair(grid, unit.chain)
    materialize(unit.path, small=small, large=large, size=unit.size, calibration=settings.get("calibration"),
                dtype=settings.get("dtype", "float32"), seed=grid.spec.get("seed", 0), progress=progress,
                **unit.options)
    return True


def _chain_settings(grid: Grid, chain: str):
    """The chain's data set and distillation settings (every default filled in), for training outside it."""
    from cbd_engine.spec.chain import parse_spec
    from cbd_engine.spec.distill_config import DistillConfig

    plan = parse_spec(grid.spec["chains"][chain])
    return plan.dataset, DistillConfig.from_dict(plan.distillation)


def _heal(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.pipelines.heal import heal

    if (unit.path / "metrics.json").is_file():
        return False
    dataset, config = _chain_settings(grid, unit.chain)
    heal(grid.model(unit.base).path, _pair(grid, unit.chain)[1], unit.path, unit.heal, dataset=dataset,
         config=config, work_dir=unit.path.with_name(unit.path.name + ".work"), resume=True, progress=progress)
    return True


def _distill_from(grid: Grid, unit: ModelUnit, teacher: Path, start: Path, target: dict, steps: int,
                  progress: ProgressCallback) -> None:
    """Prune `start` to `target` (size or shape, with the chain's calibration) and distill it from `teacher` for
    `steps` steps on the chain's data, as a chain anchor is made."""
    from dataclasses import replace

    from cbd_engine.distillation.recipe import distill
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.pipelines.chain import ChainData

    dataset, config = _chain_settings(grid, unit.chain)
    config = replace(config, steps=steps)
    data = ChainData.load(dataset, start, config)
    pruned = unit.path.with_name(unit.path.name + ".pruned")
    if not (pruned / "config.json").is_file():
        materialize(pruned, large=start, calibration=data.calibration, dtype="float32", seed=config.seed,
                    progress=progress, **target)
    distill(teacher, pruned, data.examples, unit.path, config, work_dir=unit.path.with_name(unit.path.name + ".work"),
            resume=True, stage=unit.id, progress=progress)


def _direct_distill(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    """At the very shape the interpolated models of its size have, so only how the weights were made differs."""
    if (unit.path / "metrics.json").is_file():
        return False
    source = _anchor(grid, unit.chain, 0)
    twin = next(u for u in grid.models if u.kind == "materialized" and u.size == unit.size and u.init != "random"
                and not u.options.get("init"))
    shape = json.loads((twin.path / "cbd.json").read_text())["shape"]
    _distill_from(grid, unit, source, source, {"shape": shape}, unit.options["steps"], progress)
    return True


def _cross(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.spec.families import ModelSpec, read_config

    if (unit.path / "metrics.json").is_file():
        return False
    index = unit.options["anchor"]
    ends = {"anchor": _anchor(grid, unit.chain, index - 1), "source": _anchor(grid, unit.chain, 0)}
    shape = ModelSpec.from_config(read_config(_anchor(grid, unit.chain, index))).shape.to_dict()
    _distill_from(grid, unit, ends[unit.options["teacher"]], ends[unit.options["init"]], {"shape": shape},
                  unit.options["steps"], progress)
    return True


def _train(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.distillation.train import train
    from cbd_engine.spec.distill_config import DistillConfig

    if (unit.path / "metrics.json").is_file():
        return False
    training = grid.spec["training"]
    settings = {"seed": grid.spec.get("seed", 0), **training.get("settings", {})}
    train(grid.model(unit.base).path, training["data"], unit.path, unit.tokens, DistillConfig.from_dict(settings),
          resume=True, progress=progress)
    return True


def _evaluate(grid: Grid, unit: ModelUnit, progress: ProgressCallback) -> bool:
    """The held-out losses (per row, so that models compare pair-wise) and the listed tasks of one model."""
    from cbd_engine.evaluation import evaluate

    target = grid.out / "evals" / f"{unit.id}.json"
    evaluation = grid.spec.get("evaluation") or {}
    data = evaluation.get("validation_data") or (grid.spec.get("training") or {}).get("data") or \
        grid.spec["chains"][unit.chain]["dataset"]["path"]
    asked = {"evaluation": evaluation, "validation_data": data}  # other settings: evaluate again
    if target.is_file() and json.loads(target.read_text()).get("experiment_settings") == asked:
        return False
    settings = {key: evaluation[key] for key in ("limit", "shots", "batch_size", "max_length", "device")
                if key in evaluation}
    results = evaluate(unit.path, evaluation["tasks"], progress=progress, **settings) \
        if evaluation.get("tasks") else {"tasks": {}}
    results["experiment_settings"] = asked
    length = evaluation.get("validation_max_length", 256)
    results["tasks"][VALIDATION] = _held_out(unit.path, data, length)
    for path in evaluation.get("held_out", []):
        results["tasks"][f"held_out:{Path(path).stem}"] = _held_out(unit.path, path, length)
    write_text_atomically(target, json.dumps(results, indent=1))
    return True


def _held_out(model_dir: Path, data: str | Path, max_length: int) -> dict:
    """The response-token loss on the validation rows of an instruction file, with every row's (sum, tokens)."""
    from cbd_engine.data.batches import encode_rows, pad_id_of
    from cbd_engine.data.rows import read_instruction_rows, split_rows
    from cbd_engine.evaluation.stats import ratio_ci
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import example_losses

    tokenizer = load_tokenizer(model_dir)
    examples = encode_rows(tokenizer, split_rows(read_instruction_rows(data)).validation, max_length=max_length)
    rows = example_losses(load_model(model_dir), examples, pad_id_of(tokenizer))
    loss, ci = ratio_ci([s for s, _ in rows], [c for _, c in rows])
    return {"rows": rows, "metrics": {"loss": {"value": loss, "ci95": list(ci) if ci else None}}}


# --- results --------------------------------------------------------------------------------------------------------


def _collect(grid: Grid) -> list[dict]:
    """One row per (model, task, metric), with what the model is."""
    from cbd_engine.spec.families import ModelSpec, read_config

    rows = []
    for unit in grid.models:
        results = json.loads((grid.out / "evals" / f"{unit.id}.json").read_text())
        params = ModelSpec.from_config(read_config(unit.path)).num_params
        alpha = recorded_alpha(unit)
        for task, result in results["tasks"].items():
            for name, value in result["metrics"].items():
                ci = value.get("ci95") or [None, None]
                rows.append({"model": unit.id, "kind": unit.kind, "init": unit.init, "chain": unit.chain,
                             "size": unit.size, "params": params, "alpha": alpha, "heal": unit.heal,
                             "tokens": unit.tokens, "task": task, "metric": name, "value": value["value"],
                             "ci_low": ci[0], "ci_high": ci[1]})
    return rows


def _manifest(out: Path, spec: dict, command: list[str] | None) -> dict:
    path = out / "manifest.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    import torch
    import transformers

    return {"out": str(out), "spec": spec, "seed": spec.get("seed", 0),
            "commands": previous.get("commands", []) + ([command] if command else []),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "cbd_commit": _git_commit()},
            "machine": {"platform": platform.platform(), "cpus": _cpu_count()},
            "units": previous.get("units", {})}


def _save_manifest(out: Path, manifest: dict) -> None:
    write_text_atomically(out / "manifest.json", json.dumps(manifest, indent=1, default=str))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
