"""`run_experiment(spec, out)`: a resumable grid that reproduces the paper's comparisons on one machine (issue 5).

The recipe, top to bottom:
  1. chains: each named chain spec (a POST /chains body) is built into out/chains/NAME (build_chain, resumable),
     the chain the grid interpolates first; right after it:
  2. models: SLMs between two anchors of that chain, for every (size, init) of the grid and every alpha of the
     alpha sweep, written by the materializer into out/models/ID
  3. training: the runs of the training grid (a model id x a token budget) with `cbd train` into out/trained/ID
  4. evaluation, once every chain is built: every anchor, model and trained model on the held-out validation loss
     and the listed tasks, into out/evals/ID.json
  5. report: results.csv (one row per model and metric), results.md (the paper's tables), plots, manifest.json

Every unit writes its output atomically and is skipped when that output exists, so an interrupted run continues
where it stopped; `manifest.json` records the spec, versions, seeds, the command and each unit's seconds.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cbd_engine.files import write_text_atomically
from cbd_engine.progress import ProgressCallback, no_progress
from cbd_engine.shapes import parse_size

VALIDATION = "validation_loss"  # the contract's validation rows of the training data: the curves' own metric
EXPERIMENT_KEYS = {"name", "seed", "chains", "interpolate", "training", "evaluation"}


@dataclass(frozen=True)
class ModelUnit:
    """One model of the grid: an anchor of a chain, a materialized SLM, or a trained one."""

    id: str
    kind: str  # "anchor", "materialized" or "trained"
    init: str  # "anchor", "cbd", "random", "single", "learngene_auto", "learngene_van"
    size: int | None = None  # the requested size (materialized, trained)
    alpha: float | str | None = None  # cbd only: a number or "default"
    chain: str | None = None
    tokens: int = 0  # training budget read after materialization
    base: str | None = None  # trained: the model id it started from
    path: Path = field(default=Path())


def _size_label(size: int) -> str:
    return f"{size / 1e6:g}M"


def _alpha_label(alpha: float | str) -> str:
    return "default" if alpha == "default" else f"{float(alpha):g}"


@dataclass
class Plan:
    spec: dict
    out: Path
    models: list[ModelUnit]

    def model(self, model_id: str) -> ModelUnit:
        for unit in self.models:
            if unit.id == model_id:
                return unit
        raise ValueError(f"no model {model_id!r} in the grid; known: {[u.id for u in self.models]}")


def plan_experiment(spec: dict, out: Path) -> Plan:
    """Every model of the grid with its id and folder; errors name the spec field."""
    unknown = sorted(set(spec) - EXPERIMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown experiment fields {unknown}; allowed: {sorted(EXPERIMENT_KEYS)}")
    chains = spec.get("chains") or {}
    if not chains:
        raise ValueError("chains: at least one named chain spec (a POST /chains body) is needed")
    models: list[ModelUnit] = []
    for name, chain_spec in chains.items():
        anchors = len(chain_spec.get("anchors") or [])
        for index in range(anchors + 1):
            models.append(ModelUnit(f"{name}-anchor{index}", "anchor", "anchor", chain=name,
                                    path=out / "chains" / name / f"anchor-{index:02d}"))
    grid = spec.get("interpolate")
    if grid:
        if grid.get("chain") not in chains:
            raise ValueError(f"interpolate.chain must name one of the chains {sorted(chains)}")
        for size in grid.get("sizes", []):
            for init in grid.get("inits", ["cbd"]):
                alpha = "default" if init == "cbd" else None
                models.append(_materialized(out, grid["chain"], init, parse_size(size), alpha))
        sweep = grid.get("alpha_sweep")
        if sweep:
            for alpha in sweep["alphas"]:
                unit = _materialized(out, grid["chain"], "cbd", parse_size(sweep["size"]), alpha)
                if unit.id not in {m.id for m in models}:
                    models.append(unit)
    training = spec.get("training") or {}
    for run in training.get("runs", []):
        base = next((m for m in models if m.id == run["model"]), None)
        if base is None:
            raise ValueError(f"training.runs: no model {run['model']!r} in the grid")
        for tokens in training.get("budgets", []):
            unit_id = f"{base.id}+{int(tokens)}tok"
            models.append(ModelUnit(unit_id, "trained", base.init, base.size, base.alpha, base.chain, int(tokens),
                                    base.id, out / "trained" / unit_id))
    return Plan(spec, out, models)


def _materialized(out: Path, chain: str, init: str, size: int, alpha: float | str | None) -> ModelUnit:
    unit_id = f"{init}-{_size_label(size)}" + (f"-a{_alpha_label(alpha)}" if alpha is not None else "")
    return ModelUnit(unit_id, "materialized", init, size, alpha, chain, path=out / "models" / unit_id)


# --- the recipe -----------------------------------------------------------------------------------------------------


def run_experiment(spec: dict, out: str | Path, *, progress: ProgressCallback = no_progress,
                   command: list[str] | None = None, log: Callable[[str], None] = print) -> Plan:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_experiment(spec, out)
    manifest = _manifest(out, spec, command)
    interpolated = (spec.get("interpolate") or {}).get("chain")
    chains = sorted(spec["chains"], key=lambda name: name != interpolated)  # the grid's own chain first
    for name in chains:
        _timed(manifest, f"chain {name}", lambda n=name: _build_chain(out, n, spec["chains"][n], progress), log)
        if name != interpolated:
            continue
        for unit in plan.models:
            if unit.kind == "materialized":
                _timed(manifest, f"materialize {unit.id}", lambda u=unit: _materialize(plan, u), log)
        for unit in plan.models:
            if unit.kind == "trained":
                _timed(manifest, f"train {unit.id}", lambda u=unit: _train(plan, u, progress), log)
    for unit in plan.models:
        _timed(manifest, f"evaluate {unit.id}", lambda u=unit: _evaluate(plan, u, progress), log)
    from cbd_engine.experiment_report import write_report

    write_report(plan, _collect(plan))
    _save_manifest(out, manifest)
    return plan


def _timed(manifest: dict, label: str, work: Callable[[], bool], log: Callable[[str], None]) -> None:
    """Run one unit; it returns False when its output already existed (resumed), so its seconds stay recorded."""
    started = time.monotonic()
    if work():
        manifest["units"][label] = round(time.monotonic() - started, 1)
        log(f"{label}: {manifest['units'][label]} s")
        _save_manifest(Path(manifest["out"]), manifest)


def _build_chain(out: Path, name: str, chain_spec: dict, progress: ProgressCallback) -> bool:
    from cbd_engine.chain import build_chain

    folder = out / "chains" / name
    expected = len(chain_spec["anchors"])
    if (folder / f"anchor-{expected:02d}" / "metrics.json").is_file():
        return False
    build_chain(chain_spec, folder, resume=True, progress=progress)
    return True


def _anchor_paths(plan: Plan, chain: str) -> tuple[Path, Path]:
    small, large = plan.spec["interpolate"].get("between", [1, 2])[::-1]
    folder = plan.out / "chains" / chain
    return folder / f"anchor-{small:02d}", folder / f"anchor-{large:02d}"


def _materialize(plan: Plan, unit: ModelUnit) -> bool:
    from cbd_engine.materialize import materialize

    if (unit.path / "config.json").is_file():
        return False
    grid = plan.spec["interpolate"]
    small, large = _anchor_paths(plan, unit.chain)
    alpha = None if unit.alpha in (None, "default") else float(unit.alpha)
    materialize(unit.path, small=small, large=large, size=unit.size, alpha=alpha, init=unit.init,
                calibration=grid.get("calibration"), dtype=grid.get("dtype", "float32"),
                seed=plan.spec.get("seed", 0))
    return True


def _train(plan: Plan, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.distill_config import DistillConfig
    from cbd_engine.train import train

    if (unit.path / "metrics.json").is_file():
        return False
    training = plan.spec["training"]
    settings = {"seed": plan.spec.get("seed", 0), **training.get("settings", {})}
    train(plan.model(unit.base).path, training["data"], unit.path, unit.tokens, DistillConfig.from_dict(settings),
          resume=True, progress=progress)
    return True


def _evaluate(plan: Plan, unit: ModelUnit, progress: ProgressCallback) -> bool:
    from cbd_engine.evaluation import evaluate
    from cbd_engine.models import validation_loss

    target = plan.out / "evals" / f"{unit.id}.json"
    evaluation = plan.spec.get("evaluation") or {}
    data = evaluation.get("validation_data") or (plan.spec.get("training") or {}).get("data")
    asked = {"evaluation": evaluation, "validation_data": data}  # other settings: evaluate again
    if target.is_file() and json.loads(target.read_text()).get("experiment_settings") == asked:
        return False
    settings = {key: evaluation[key] for key in ("limit", "shots", "batch_size", "max_length", "device")
                if key in evaluation}
    results = evaluate(unit.path, evaluation["tasks"], progress=progress, **settings) \
        if evaluation.get("tasks") else {"tasks": {}}
    results["experiment_settings"] = asked
    if data:
        loss = validation_loss(unit.path, data, max_length=evaluation.get("validation_max_length", 256),
                               device=evaluation.get("device", "auto"))
        results["tasks"][VALIDATION] = {"rows": None, "metrics": {"loss": {"value": loss, "ci95": None}}}
    write_text_atomically(target, json.dumps(results, indent=1))
    return True


# --- results --------------------------------------------------------------------------------------------------------


def _collect(plan: Plan) -> list[dict]:
    """One row per (model, task, metric), with what the model is."""
    from cbd_engine.checkpoint import read_config
    from cbd_engine.families import ModelSpec

    rows = []
    for unit in plan.models:
        results = json.loads((plan.out / "evals" / f"{unit.id}.json").read_text())
        params = ModelSpec.from_config(read_config(unit.path)).num_params
        alpha = _recorded_alpha(unit)
        for task, result in results["tasks"].items():
            for name, value in result["metrics"].items():
                ci = value.get("ci95") or [None, None]
                rows.append({"model": unit.id, "kind": unit.kind, "init": unit.init, "chain": unit.chain,
                             "size": unit.size, "params": params, "alpha": alpha, "tokens": unit.tokens,
                             "task": task, "metric": name, "value": value["value"], "ci_low": ci[0],
                             "ci_high": ci[1]})
    return rows


def _recorded_alpha(unit: ModelUnit) -> float | None:
    """The alpha the materializer used (the default resolves to a number in the model's cbd.json)."""
    if unit.init != "cbd":
        return None
    return json.loads((unit.path / "cbd.json").read_text()).get("alpha")  # a trained model keeps its init's record


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
