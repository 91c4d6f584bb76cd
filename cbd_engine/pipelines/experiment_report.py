"""The experiment's report: results.csv, results.md (the paper's tables in miniature, with the baselines it leaves
out) and plots.

Sections (each only when the grid has what it needs):
  - all models: every metric with its 95% confidence interval
  - anchors of every chain (Table 5 analogue when there are two chains: stepwise against direct)
  - interpolation: at each size every variant (and the direct baseline), as materialized and after each heal,
    with the paired difference to the reference variant (alpha 0 by default: the larger anchor pruned to the size)
    and its 95% bootstrap interval, on every held-out set
  - the alpha sweep (Figure 6 analogue), one line per mix
  - two by two: initialization against teacher at equal steps
  - Table 1 / Figure 4 analogues: the random init trained against the interpolated model untrained
A difference counts only when its interval excludes 0; the tables mark those with *.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from cbd_engine.evaluation.stats import paired_difference
from cbd_engine.pipelines.experiment_grid import VALIDATION, Grid, ModelUnit, row_losses
from cbd_engine.spec.shapes import parse_size

PRIMARY = (VALIDATION, "loss")
CSV_FIELDS = ("model", "kind", "init", "chain", "size", "params", "alpha", "heal", "tokens", "task", "metric",
              "value", "ci_low", "ci_high")


def write_report(grid: Grid, rows: list[dict]) -> None:
    with open(grid.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = _by_model(rows)
    columns = sorted({(row["task"], row["metric"]) for row in rows}, key=lambda c: (c != PRIMARY, c))
    sections = [f"# Experiment `{grid.spec.get('name', grid.out.name)}`\n", _commands(grid.out),
                "## All models\n" + _models_table(grid.models, table, columns)]
    for build in (_anchors, _interpolation, _sweep, _two_by_two, _table_1, _figure_4):
        section = build(grid, table, columns)
        if section:
            sections.append(section)
    (grid.out / "results.md").write_text("\n\n".join(sections) + "\n")


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
    return [unit.id, unit.init, f"{entry['params'] / 1e6:.4g}M", "-" if alpha is None else f"{alpha:.3g}",
            str(unit.heal), f"{unit.tokens:,}"]


def _models_table(units: list[ModelUnit], table: dict, columns: list[tuple[str, str]]) -> str:
    text = _header(["model", "variant", "params", "alpha", "heal steps", "trained tokens"]
                   + [_column_name(c) for c in columns])
    for unit in units:
        if unit.id in table:
            text += "| " + " | ".join(_describe(unit, table[unit.id]) + [_cell(table[unit.id], c) for c in columns])
            text += " |\n"
    return text


def _held_out_tasks(columns: list[tuple[str, str]]) -> list[str]:
    """The loss tasks that keep per-row numbers: the chain's validation rows and each held-out set."""
    return [task for task, metric in columns if metric == "loss" and (task == VALIDATION or
                                                                     task.startswith("held_out:"))]


def difference(grid: Grid, unit_id: str, reference_id: str, task: str) -> str:
    """'d [low, high]' of the paired per-row difference (negative: unit better), * when 0 is outside."""
    a, b = row_losses(grid, unit_id, task), row_losses(grid, reference_id, task)
    if a is None or b is None or unit_id == reference_id:
        return "-"
    value, (low, high) = paired_difference(a, b)
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]" + ("*" if low > 0 or high < 0 else "")


def _anchors(grid: Grid, table: dict, columns: list) -> str | None:
    units = [u for u in grid.models if u.kind == "anchor" and u.id in table]
    title = "Table 5 analogue: the anchors of each chain (stepwise against direct)" \
        if len({u.chain for u in units}) > 1 else "The chain's anchors"
    return (f"## {title}\nAnchor 0 is the source; each later anchor was pruned from its predecessor and distilled "
            "from it (each chain's spec is in manifest.json).\n\n" + _models_table(units, table, columns))


def _interpolation(grid: Grid, table: dict, columns: list) -> str | None:
    settings = grid.spec.get("interpolate")
    if not settings or not settings.get("sizes"):
        return None
    reference = settings.get("reference", "alpha0")
    tasks = _held_out_tasks(columns)
    heals = [0] + [k for k in settings.get("heal_steps", []) if k]
    names = ["size", "heal steps", "model", "alpha"] + [name for task in tasks
                                                        for name in (f"{task} loss", f"vs {reference}")]
    text = _header(names)
    for size in (parse_size(s) for s in settings["sizes"]):
        for heal in heals:
            units = [u for u in grid.models if u.size == size and u.heal == heal and u.id in table
                     and (u.kind in ("materialized", "healed") and not u.init.startswith("sweep")
                          or (u.kind == "direct" and heal == 0))]
            base = next((u.id for u in units if u.init == reference and u.kind != "direct"), None)
            for unit in units:
                entry = table[unit.id]
                alpha = entry.get("alpha")
                cells = [f"{entry[(task, 'loss')][0]:.3f} | " + (difference(grid, unit.id, base, task) if base else "-")
                         for task in tasks]
                text += "| " + " | ".join([f"{size / 1e6:g}M", str(heal), unit.id,
                                            "-" if alpha is None else f"{alpha:.3g}"] + cells) + " |\n"
    _plot_score_vs_size(grid, table)
    return ("## Interpolation between two anchors, against the strongest simple baselines\n"
            f"Each cell: the loss, then the paired per-row difference to `{reference}` at the same size and heal "
            "steps with its 95% bootstrap interval (negative: better; * the interval excludes 0). `direct` is the "
            "source pruned to the size and distilled for the chain's student steps.\n\n"
            "![score against size](score_vs_size.png)\n\n" + text)


def _plot_score_vs_size(grid: Grid, table: dict) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    chain = grid.spec["interpolate"]["chain"]
    series: dict[str, list] = defaultdict(list)
    for unit in grid.models:
        if unit.id in table and PRIMARY in table[unit.id] and unit.heal == 0 and not unit.init.startswith("sweep"):
            if unit.kind in ("materialized", "direct") or (unit.kind == "anchor" and unit.chain == chain):
                series["anchors" if unit.kind == "anchor" else unit.init].append(
                    (table[unit.id]["params"] / 1e6, table[unit.id][PRIMARY][0]))
    for name, points in sorted(series.items()):
        points.sort()
        axis.plot([p for p, _ in points], [v for _, v in points], "ks" if name == "anchors" else "o-", label=name)
    axis.set_yscale("log")
    _save(figure, grid.out / "score_vs_size.png", "parameters (M)", "validation loss",
          "validation loss against size, no training after materialization")


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


def _sweep(grid: Grid, table: dict, columns: list) -> str | None:
    sweep = (grid.spec.get("interpolate") or {}).get("alpha_sweep")
    if not sweep:
        return None
    points = _sweep_points(grid, table)
    sizes = sorted({size for size, _ in points} & {u.size for u in grid.models if u.init.startswith("sweep-")})
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 4), squeeze=False)
    alphas = sorted({alpha for (size, _), line in points.items() if size in sizes for alpha in line})
    text = _header(["size", "mix"] + [f"alpha {a:g}" for a in alphas] + ["best", "auto (alpha)", "auto - best"])
    for axis, size in zip(axes[0], sizes, strict=True):
        auto = next((u for u in grid.models if u.size == size and u.init == "auto" and u.kind == "materialized"
                     and u.id in table), None)
        for mix in sorted(mix for at, mix in points if at == size):
            line = sorted(points[size, mix].items())
            losses = [table[unit_id][PRIMARY][0] for _, unit_id in line]
            axis.plot([alpha for alpha, _ in line], losses, "o-", label=f"{mix} mix")
            best = min(losses)
            auto_cells = ["-", "-"] if auto is None else [
                f"{table[auto.id][PRIMARY][0]:.3f} ({table[auto.id]['alpha']:.3g})",
                f"{table[auto.id][PRIMARY][0] - best:+.3f}"]
            cells = [f"{table[points[size, mix][a]][PRIMARY][0]:.3f}" if a in points[size, mix] else "-"
                     for a in alphas]
            text += "| " + " | ".join([f"{size / 1e6:g}M", mix, *cells, f"{best:.3f}", *auto_cells]) + " |\n"
        if auto is not None:
            axis.plot([table[auto.id]["alpha"]], [table[auto.id][PRIMARY][0]], "r*", markersize=12, label="auto")
        axis.set_title(f"{size / 1e6:g}M")
        axis.set_xlabel("alpha (weight of the smaller anchor)")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss")
    figure.suptitle("Figure 6 analogue: alpha sweeps")
    figure.tight_layout()
    figure.savefig(grid.out / "figure6_alpha_sweep.png", dpi=100)
    plt.close(figure)
    return ("## Figure 6 analogue: alpha sweeps\n"
            "alpha 0 is the larger anchor pruned to the size; alpha 1 takes the smaller anchor's weights wherever it "
            "has the unit (in the unit mix, the larger anchor's own units fill the rest; in the paper's mix, E's "
            "fill); `auto` chose its alpha on the dev rows, these losses are on the validation rows.\n\n"
            "![alpha sweep](figure6_alpha_sweep.png)\n\n" + text)


def _sweep_points(grid: Grid, table: dict) -> dict[tuple[int, str], dict[float, str]]:
    """(size, mix) -> {alpha: model id} of every materialized model that differs from the defaults only by a fixed
    alpha and a mix: the sweep's own and variants such as alpha 0 and 1, so the grid need not make them twice."""
    points: dict[tuple[int, str], dict[float, str]] = defaultdict(dict)
    for unit in grid.models:
        alpha = unit.options.get("alpha")
        if unit.kind == "materialized" and unit.id in table and set(unit.options) <= {"alpha", "mix"} \
                and isinstance(alpha, int | float):
            points[unit.size, unit.options.get("mix", "unit")].setdefault(float(alpha), unit.id)
    return points


def _two_by_two(grid: Grid, table: dict, columns: list) -> str | None:
    units = {u.options["init"] + "/" + u.options["teacher"]: u for u in grid.models if u.kind == "cross"
             and u.id in table}
    if len(units) < 4:
        return None
    tasks = _held_out_tasks(columns)
    text = _header(["initialized from", "taught by"] + [f"{t} loss" for t in tasks])
    for key, unit in units.items():
        start, teacher = key.split("/")
        text += "| " + " | ".join([start, teacher] + [f"{table[unit.id][(t, 'loss')][0]:.3f}" for t in tasks])
        text += " |\n"
    effects = _header(["effect", "at", "held-out set", "difference [95% interval]"])
    for task in tasks:
        for other in ("anchor", "source"):
            effects += (f"| initialization: anchor - source | teacher {other} | {task} | "
                        f"{difference(grid, units[f'anchor/{other}'].id, units[f'source/{other}'].id, task)} |\n")
            effects += (f"| teacher: anchor - source | init {other} | {task} | "
                        f"{difference(grid, units[f'{other}/anchor'].id, units[f'{other}/source'].id, task)} |\n")
    steps = next(iter(units.values())).options["steps"]
    return ("## Stepwise against direct, the two causes apart (2 x 2 at equal steps)\n"
            f"The anchor's shape made four ways, each distilled {steps} steps: pruned from the previous anchor or "
            "from the source, taught by either. Negative differences favour the anchor.\n\n" + text + "\n" + effects)


def _table_1(grid: Grid, table: dict, columns: list) -> str | None:
    trained = [u for u in grid.models if u.kind == "trained"]
    if not trained:
        return None
    sizes = {u.size for u in trained}
    units = [u for u in grid.models if u.size in sizes and u.heal == 0 and u.kind in ("materialized", "trained")
             and (u.init in ("auto", "random") or u.kind == "trained")]
    return ("## Table 1 analogue: CBD against Rand at equal token budgets\n"
            "Rand is a random init of the same shape trained with `cbd train`; `auto` is the interpolated model as "
            "materialized (0 tokens).\n\n" + _models_table(sorted(units, key=lambda u: (u.size, u.tokens)), table,
                                                          columns))


def _figure_4(grid: Grid, table: dict, columns: list) -> str | None:
    trained = [u for u in grid.models if u.kind == "trained"]
    if not trained:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = [_header(["trained run", "start loss", "reference: CBD untrained", "loss after budget",
                      "tokens to reach the reference"])]
    for unit in trained:
        curve = _validation_curve(unit.path / "loss_curve.csv")
        axis.plot([t for t, _ in curve], [v for _, v in curve], "o-", label=unit.id)
        reference = _untrained_cbd(grid, unit.size, table)
        reached = next((tokens for tokens, value in curve if reference is not None and value <= reference), None)
        lines.append(f"| {unit.id} | {curve[0][1]:.3f} | {_maybe(reference)} | {curve[-1][1]:.3f} | "
                     f"{'not within the budget' if reached is None else f'{reached:,}'} |\n")
    for size in sorted({u.size for u in trained}):
        reference = _untrained_cbd(grid, size, table)
        if reference is not None:
            axis.axhline(reference, linestyle="--", color="gray")
            axis.annotate(f"CBD {size / 1e6:g}M, 0 tokens", (0, reference), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
    _save(figure, grid.out / "figure4_loss_curves.png", "training tokens", "dev loss (response tokens)",
          "Figure 4 analogue: training curves against CBD's step-0 loss")
    return ("## Figure 4 analogue: tokens to reach CBD's untrained loss\n"
            "The curves are dev losses (the rows training selects on); the reference is CBD's validation loss.\n\n"
            "![loss curves](figure4_loss_curves.png)\n\n" + "".join(lines))


def _validation_curve(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="") as handle:
        return [(int(row["tokens"] or 0), float(row["dev_loss"])) for row in csv.DictReader(handle)
                if row.get("dev_loss")]


def _untrained_cbd(grid: Grid, size: int | None, table: dict) -> float | None:
    unit = next((u for u in grid.models if u.kind == "materialized" and u.init == "auto" and u.size == size), None)
    return table[unit.id][PRIMARY][0] if unit is not None and PRIMARY in table.get(unit.id, {}) else None


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
