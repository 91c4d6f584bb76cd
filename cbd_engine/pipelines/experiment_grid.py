"""The experiment grid, planned (pipelines/experiment.py runs it, experiment_report.py reports it): every model of
the grid with its id and folder, and what the report reads back of each."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cbd_engine.spec.shapes import parse_size

VALIDATION = "validation_loss"  # the contract's validation rows of the chain's data: the curves' own metric
EXPERIMENT_KEYS = {"name", "seed", "chains", "interpolate", "direct", "two_by_two", "training", "evaluation"}
DEFAULT_VARIANTS = {"auto": {}}  # materialize's defaults: unit mix, alpha chosen on the dev rows


@dataclass(frozen=True)
class ModelUnit:
    """One model of the grid."""

    id: str
    kind: str  # "anchor", "materialized", "healed", "direct", "cross" (two_by_two), "trained"
    init: str  # the variant's name ("auto", "alpha0", ...), "anchor", or how it was made
    size: int | None = None  # the requested size
    chain: str | None = None
    options: dict = field(default_factory=dict, hash=False)  # materialize options; cross: init/teacher anchors
    heal: int = 0  # healing steps after materialization
    tokens: int = 0  # training budget read after materialization
    base: str | None = None  # healed and trained: the model id it started from
    path: Path = field(default=Path())


def _size_label(size: int) -> str:
    return f"{size / 1e6:g}M"


@dataclass
class Grid:
    spec: dict
    out: Path
    models: list[ModelUnit]

    def model(self, model_id: str) -> ModelUnit:
        for unit in self.models:
            if unit.id == model_id:
                return unit
        raise ValueError(f"no model {model_id!r} in the grid; known: {[u.id for u in self.models]}")


def plan_experiment(spec: dict, out: Path) -> Grid:
    """Every model of the grid with its id and folder; errors name the spec field."""
    unknown = sorted(set(spec) - EXPERIMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown experiment fields {unknown}; allowed: {sorted(EXPERIMENT_KEYS)}")
    chains = spec.get("chains") or {}
    if not chains:
        raise ValueError("chains: at least one named chain spec (a POST /chains body) is needed")
    models: list[ModelUnit] = []
    for name, chain_spec in chains.items():
        for index in range(len(chain_spec.get("anchors") or []) + 1):
            models.append(ModelUnit(f"{name}-anchor{index}", "anchor", "anchor", chain=name,
                                    path=out / "chains" / name / f"anchor-{index:02d}"))
    for section in ("interpolate", "direct", "two_by_two"):
        if spec.get(section) and spec[section].get("chain") not in chains:
            raise ValueError(f"{section}.chain must name one of the chains {sorted(chains)}")
    models += _interpolated(spec.get("interpolate"), out)
    models += _direct(spec.get("direct"), spec.get("interpolate"), out)
    models += _two_by_two(spec.get("two_by_two"), out)
    models += _trained(spec.get("training") or {}, models, out)
    return Grid(spec, out, models)


def _interpolated(grid: dict | None, out: Path) -> list[ModelUnit]:
    if not grid:
        return []
    variants = grid.get("variants") or DEFAULT_VARIANTS
    units = [ModelUnit(f"{name}-{_size_label(parse_size(size))}", "materialized", name, parse_size(size),
                       grid["chain"], dict(options), path=out / "models" / f"{name}-{_size_label(parse_size(size))}")
             for size in grid.get("sizes", []) for name, options in variants.items()]
    heal_variants = grid.get("heal_variants") or list(variants)
    if set(heal_variants) - set(variants):
        raise ValueError(f"interpolate.heal_variants {sorted(set(heal_variants) - set(variants))} are not variants")
    healed = [ModelUnit(f"{u.id}+heal{k}", "healed", u.init, u.size, u.chain, u.options, heal=k, base=u.id,
                        path=out / "healed" / f"{u.id}+heal{k}") for k in grid.get("heal_steps", []) if k
              for u in units if u.init in heal_variants]
    sweep = grid.get("alpha_sweep") or {}
    swept = [ModelUnit(f"sweep-{mix}-{_size_label(size)}-a{float(alpha):g}", "materialized", f"sweep-{mix}", size,
                       grid["chain"], {"alpha": float(alpha), "mix": mix},
                       path=out / "models" / f"sweep-{mix}-{_size_label(size)}-a{float(alpha):g}")
             for size in _sweep_sizes(sweep) for mix in sweep.get("mixes", ["unit"]) for alpha in sweep["alphas"]]
    return units + healed + swept


def _sweep_sizes(sweep: dict) -> list[int]:
    return [parse_size(size) for size in sweep.get("sizes", [sweep["size"]] if "size" in sweep else [])]


def _direct(direct: dict | None, grid: dict | None, out: Path) -> list[ModelUnit]:
    """The source pruned to each size of the interpolation grid (or of its own `sizes`) and distilled from the
    source."""
    if not direct:
        return []
    return [ModelUnit(f"direct-{_size_label(parse_size(size))}", "direct", "direct", parse_size(size),
                      direct["chain"], {"steps": direct["steps"]},
                      path=out / "direct" / f"direct-{_size_label(parse_size(size))}")
            for size in direct.get("sizes") or (grid or {}).get("sizes", [])]


def _two_by_two(cross: dict | None, out: Path) -> list[ModelUnit]:
    """Anchor k of a chain (its shape) made four ways: pruned from anchor k - 1 or from the source, distilled from
    either, the same steps. (Pruned from and taught by anchor k - 1 is the chain's own anchor k when the steps are
    the chain's.)"""
    if not cross:
        return []
    units = []
    for start in ("anchor", "source"):
        for teacher in ("anchor", "source"):
            unit_id = f"2x2-init_{start}-teacher_{teacher}"
            units.append(ModelUnit(unit_id, "cross", unit_id, None, cross["chain"],
                                   {"anchor": cross.get("anchor", 2), "init": start, "teacher": teacher,
                                    "steps": cross["steps"]}, path=out / "cross" / unit_id))
    return units


def _trained(training: dict, models: list[ModelUnit], out: Path) -> list[ModelUnit]:
    units = []
    for run in training.get("runs", []):
        base = next((m for m in models if m.id == run["model"]), None)
        if base is None:
            raise ValueError(f"training.runs: no model {run['model']!r} in the grid")
        for tokens in training.get("budgets", []):
            unit_id = f"{base.id}+{int(tokens)}tok"
            units.append(ModelUnit(unit_id, "trained", base.init, base.size, base.chain, base.options,
                                   tokens=int(tokens), base=base.id, path=out / "trained" / unit_id))
    return units


# --- the recipe -----------------------------------------------------------------------------------------------------


def recorded_alpha(unit: ModelUnit) -> float | None:
    """The alpha the materializer used, from the model's cbd.json (a healed or trained model keeps its init's)."""
    path = unit.path / "cbd.json"
    return json.loads(path.read_text()).get("alpha") if unit.kind in ("materialized", "healed") else None


def row_losses(grid: Grid, unit_id: str, task: str = VALIDATION) -> list[tuple[float, int]] | None:
    path = grid.out / "evals" / f"{unit_id}.json"
    result = json.loads(path.read_text())["tasks"].get(task) if path.is_file() else None
    return [tuple(row) for row in result["rows"]] if result and "rows" in result else None
