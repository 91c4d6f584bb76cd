"""The experiment's report: results.csv, results.md (the paper's tables in miniature) and plots.

Tables (each only when the grid has what it needs):
  - all models: every metric with its 95% confidence interval
  - Table 1 analogue: CBD against Rand (random init) at equal token budgets, per size
  - Table 3 analogue: inits side by side per size, as materialized (no training)
  - Table 5 analogue: the anchors of every chain (stepwise against direct)
  - Figure 4 analogue: tokens a trained run needs to reach the CBD model's untrained loss
  - Figure 6 analogue: the alpha sweep
The primary metric is the held-out validation loss (lower is better); the others follow as columns.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from cbd_engine.experiment import VALIDATION, ModelUnit, Plan
from cbd_engine.shapes import parse_size

PRIMARY = (VALIDATION, "loss")
CSV_FIELDS = ("model", "kind", "init", "chain", "size", "params", "alpha", "tokens", "task", "metric", "value",
              "ci_low", "ci_high")


def write_report(plan: Plan, rows: list[dict]) -> None:
    with open(plan.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = _by_model(rows)
    columns = sorted({(row["task"], row["metric"]) for row in rows}, key=lambda c: (c != PRIMARY, c))
    sections = [f"# Experiment `{plan.spec.get('name', plan.out.name)}`\n",
                _commands(plan.out),
                "## All models\n" + _models_table(plan.models, table, columns)]
    for build in (_table_1, _table_3, _table_5, _figure_4, _figure_6):
        section = build(plan, table, columns)
        if section:
            sections.append(section)
    (plan.out / "results.md").write_text("\n\n".join(sections) + "\n")


def _by_model(rows: list[dict]) -> dict[str, dict]:
    """model id -> {"params": ..., "alpha": ..., (task, metric): (value, ci_low, ci_high)}."""
    table: dict[str, dict] = defaultdict(dict)
    for row in rows:
        entry = table[row["model"]]
        entry.update(params=row["params"], alpha=row["alpha"])
        entry[(row["task"], row["metric"])] = (row["value"], row["ci_low"], row["ci_high"])
    return table


def _commands(out: Path) -> str:
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    commands = "\n".join(" ".join(command) for command in manifest.get("commands", []))
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    return f"Commands:\n```\n{commands}\n```\nVersions: {versions}; seed {manifest.get('seed', 0)}."


def _cell(entry: dict, column: tuple[str, str]) -> str:
    if column not in entry:
        return "-"
    value, low, high = entry[column]
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def _header(names: list[str]) -> str:
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n"


def _column_name(column: tuple[str, str]) -> str:
    task, metric = column
    return "validation loss" if column == PRIMARY else f"{task} {metric}"


def _describe(unit: ModelUnit, entry: dict) -> list[str]:
    alpha = entry.get("alpha")
    return [unit.id, unit.init, f"{entry['params'] / 1e6:.4g}M", "-" if alpha is None else f"{alpha:.2f}",
            f"{unit.tokens:,}"]


def _models_table(units: list[ModelUnit], table: dict, columns: list[tuple[str, str]]) -> str:
    text = _header(["model", "init", "params", "alpha", "trained tokens"] + [_column_name(c) for c in columns])
    for unit in units:
        if unit.id in table:
            text += "| " + " | ".join(_describe(unit, table[unit.id]) + [_cell(table[unit.id], c) for c in columns])
            text += " |\n"
    return text


def _rows_table(title: str, note: str, units: list[ModelUnit], table: dict, columns: list) -> str:
    return f"## {title}\n{note}\n\n" + _models_table(units, table, columns)


def _table_1(plan: Plan, table: dict, columns: list) -> str | None:
    trained_sizes = {u.size for u in plan.models if u.kind == "trained" and u.init == "random"}
    units = [u for u in plan.models if u.size in trained_sizes and u.init in ("cbd", "random")
             and u.alpha in (None, "default")]
    if not units:
        return None
    return _rows_table("Table 1 analogue: CBD against Rand at equal token budgets",
                       "Rand is a random init of the same shape trained with `cbd train`; CBD is the interpolated "
                       "model as materialized (0 tokens) and, where listed, after the same budget.",
                       sorted(units, key=lambda u: (u.size, u.init, u.tokens)), table, columns)


def _table_3(plan: Plan, table: dict, columns: list) -> str | None:
    units = [u for u in plan.models if u.kind == "materialized" and u.alpha in (None, "default")]
    if len({u.init for u in units}) < 2:
        return None
    _plot_score_vs_size(plan, units, table)
    return _rows_table("Table 3 analogue: initializations side by side, no training",
                       "cbd: lineage-aligned interpolation of the two anchors; single: expansion of the smaller "
                       "anchor only; learngene_*: LearnGene baselines from the larger anchor; random: random init."
                       "\n\n![score against size](score_vs_size.png)",
                       sorted(units, key=lambda u: (u.size, u.init)), table, columns)


def _plot_score_vs_size(plan: Plan, units: list[ModelUnit], table: dict) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for init in sorted({u.init for u in units}):
        points = sorted((table[u.id]["params"] / 1e6, table[u.id][PRIMARY][0]) for u in units
                        if u.init == init and PRIMARY in table.get(u.id, {}))
        axis.plot([p for p, _ in points], [v for _, v in points], "o-", label=init)
    chain = plan.spec["interpolate"]["chain"]
    anchors = [(table[u.id]["params"] / 1e6, table[u.id][PRIMARY][0]) for u in plan.models
               if u.kind == "anchor" and u.chain == chain and PRIMARY in table.get(u.id, {})]
    axis.plot([p for p, _ in anchors], [v for _, v in anchors], "ks", label="anchors")
    axis.set_yscale("log")
    _save(figure, plan.out / "score_vs_size.png", "parameters (M)", "validation loss",
          "validation loss against size, no training")


def _save(figure, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    axis = figure.axes[0]
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table_5(plan: Plan, table: dict, columns: list) -> str | None:
    units = [u for u in plan.models if u.kind == "anchor"]
    if len({u.chain for u in units}) < 2:
        return None
    return _rows_table("Table 5 analogue: the anchors of each chain (stepwise against direct)",
                       "Anchor 0 is the source; each later anchor was pruned from its predecessor and distilled "
                       "from it (see each chain's spec in manifest.json for the steps).", units, table, columns)


def _figure_4(plan: Plan, table: dict, columns: list) -> str | None:
    trained = [u for u in plan.models if u.kind == "trained"]
    if not trained:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = [_header(["trained run", "start loss", "reference: CBD untrained", "loss after budget",
                      "tokens to reach the reference"])]
    for unit in trained:
        curve = _validation_curve(unit.path / "loss_curve.csv")
        axis.plot([t for t, _ in curve], [v for _, v in curve], "o-", label=unit.id)
        reference = _untrained_cbd(plan, unit.size, table)
        reached = next((tokens for tokens, value in curve if reference is not None and value <= reference), None)
        lines.append(f"| {unit.id} | {curve[0][1]:.3f} | {_maybe(reference)} | {curve[-1][1]:.3f} | "
                     f"{'not within the budget' if reached is None else f'{reached:,}'} |\n")
    for size in sorted({u.size for u in trained}):
        reference = _untrained_cbd(plan, size, table)
        if reference is not None:
            axis.axhline(reference, linestyle="--", color="gray")
            axis.annotate(f"CBD {size / 1e6:g}M, 0 tokens", (0, reference), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
    _save(figure, plan.out / "figure4_loss_curves.png", "training tokens", "validation loss (response tokens)",
          "Figure 4 analogue: training curves against CBD's step-0 loss")
    return ("## Figure 4 analogue: tokens to reach CBD's untrained loss\n"
            "![loss curves](figure4_loss_curves.png)\n\n" + "".join(lines))


def _validation_curve(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="") as handle:
        return [(int(row["tokens"] or 0), float(row["validation_loss"])) for row in csv.DictReader(handle)
                if row.get("validation_loss")]


def _untrained_cbd(plan: Plan, size: int | None, table: dict) -> float | None:
    unit = next((u for u in plan.models if u.kind == "materialized" and u.init == "cbd" and u.size == size
                 and u.alpha == "default"), None)
    return table[unit.id][PRIMARY][0] if unit is not None and PRIMARY in table.get(unit.id, {}) else None


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _figure_6(plan: Plan, table: dict, columns: list) -> str | None:
    sweep = (plan.spec.get("interpolate") or {}).get("alpha_sweep")
    if not sweep:
        return None
    units = [u for u in plan.models if u.kind == "materialized" and u.init == "cbd" and u.alpha is not None
             and u.size == parse_size(sweep["size"]) and u.id in table]
    units.sort(key=lambda u: table[u.id]["alpha"])
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    alphas = [table[u.id]["alpha"] for u in units]
    axis.plot(alphas, [table[u.id][PRIMARY][0] for u in units], "o-")
    default = next((u for u in units if u.alpha == "default"), None)
    if default is not None:
        axis.plot([table[default.id]["alpha"]], [table[default.id][PRIMARY][0]], "r*", markersize=12,
                  label="default alpha")
    _save(figure, plan.out / "figure6_alpha_sweep.png", "alpha (weight of the expanded smaller anchor)",
          "validation loss", f"Figure 6 analogue: alpha sweep at {parse_size(sweep['size']) / 1e6:g}M")
    return _rows_table(f"Figure 6 analogue: alpha sweep at {parse_size(sweep['size']) / 1e6:g}M",
                       "alpha 1 is the smaller anchor expanded alone, alpha 0 the larger anchor pruned alone.\n\n"
                       "![alpha sweep](figure6_alpha_sweep.png)", units, table, columns)
