"""Line training (issue 20), measured at docs/RESULTS.md's budget on this CPU (docs/RESULTS.md, "Line training").

    PYTHONPATH=. .venv/bin/python bench/line_training.py run --work /tmp/cbd-line [--sizes 85M 78M 93M]
    PYTHONPATH=. .venv/bin/python bench/line_training.py report --work /tmp/cbd-line --out docs/results

The chain of RESULTS.md (SmolLM2-135M-Instruct -> 100M -> 70M, 60 steps of 4 rows x 256 tokens per anchor, the
recipe's defaults) built twice, without and with `distillation.interpolation: {"kind": "line"}`; anchor 1 is the
same in both (line training acts while anchor 2 is distilled from anchor 1), so it is built once and linked into
both. Then, per size between the anchors (the sizes of RESULTS.md):
  plain / line   the size materialized from each chain with the defaults (unit mix, alpha auto), no training;
  distilled      anchor 1 pruned to the size's shape and distilled from anchor 1 for the chain's 60 steps with the
                 chain's settings: what a new anchor at that size costs;
  healed         plain's model (the best initialization of RESULTS.md's grid, auto alpha) distilled from anchor 1
                 for K steps, K the extra passes of line training in heal steps (`equal_compute_steps`).
Every model is scored per row on Dolly's validation rows and UInst's; `report` writes the paired differences with
95% bootstrap intervals. Every unit is skipped when its output exists: rerun to resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from quality import HELD_OUT, mean, row_losses

DATASET = {"path": str(HELD_OUT["dolly"]), "prompt_format": "alpaca"}
DISTILLATION = {"steps": 60, "batch_size": 4, "max_length": 256, "seed": 0, "eval_every": 20, "eval_rows": 200,
                "checkpoint_every": 20}
LINE = {"kind": "line", "weight": 1.0, "points": 4}


def chain_spec(anchors: list[dict], line: bool) -> dict:
    distillation = {**DISTILLATION, **({"interpolation": LINE} if line else {})}
    return {"source": "zoo:smollm2-135m-instruct", "bridge": None, "anchors": anchors, "dataset": DATASET,
            "distillation": distillation, "device": "cpu"}


def log(message: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.1f}] {message}", flush=True)


def build_chains(work: Path) -> None:
    """Anchor 1 once (into base/), then each chain's anchor 2 from it."""
    from cbd_engine.pipelines.chain import build_chain

    base = work / "base"
    build_chain(chain_spec([{"size": "100M"}], False), base, resume=True)
    for name, line in (("plain", False), ("line", True)):
        folder = work / name
        if (folder / "anchor-02" / "metrics.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for anchor in ("anchor-00", "anchor-01"):
            if not (folder / anchor).exists():
                shutil.copytree(base / anchor, folder / anchor, copy_function=os.link)
        log(f"chain {name}: anchor 2")
        started = time.monotonic()
        build_chain(chain_spec([{"size": "100M"}, {"size": "70M"}], line), folder, resume=True)
        (folder / "anchor-02" / "seconds.json").write_text(json.dumps({"seconds": time.monotonic() - started}))


def equal_compute_steps(line_anchor: Path, teacher_params: int, size_params: int, steps: int) -> int:
    """Heal steps whose passes equal line training's extra ones. A line step adds a forward and backward of the mixed
    model (about 3 x its parameters in multiply-adds per token, the targets' mean size); a heal step is a teacher
    forward (1 x) and a student forward and backward (3 x)."""
    record = json.loads((line_anchor / "cbd.json").read_text())["distillation"]["interpolation"]
    line_params = sum(t["params"] for t in record["targets"]) / len(record["targets"])
    return round(steps * 3 * line_params / (teacher_params + 3 * size_params))


def materialized(work: Path, chain: str, size: str) -> Path:
    """The size from `chain`'s two anchors with the defaults (unit mix, alpha auto), no training."""
    from cbd_engine.materialization.recipe import materialize

    out = work / "models" / f"{chain}-{size}"
    if not out.exists():
        log(f"materialize {chain} {size}")
        materialize(out, small=work / chain / "anchor-02", large=work / chain / "anchor-01", size=size,
                    dtype="float32")
    return out


def trained_models(work: Path, size: str) -> None:
    """distilled and healed at `size` (the module docstring)."""
    from cbd_engine.distillation.recipe import distill
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.pipelines.heal import heal
    from cbd_engine.spec.distill_config import DistillConfig
    from cbd_engine.spec.families import ModelSpec, read_config

    anchor1 = work / "base" / "anchor-01"
    models = work / "models"
    shape = ModelSpec.from_config(read_config(models / f"plain-{size}")).shape
    config = DistillConfig.from_dict({**DISTILLATION, "device": "cpu"})
    distilled = models / f"distilled-{size}"
    if not distilled.exists():
        data = ChainData.load(DATASET, anchor1, config)
        pruned = models / f"distilled-{size}.pruned"
        if not pruned.exists():
            materialize(pruned, large=anchor1, shape=shape, calibration=data.calibration, dtype="float32")
        log(f"distill {size} from anchor 1, {config.steps} steps")
        distill(anchor1, pruned, data.examples, distilled, config, resume=True, stage=f"distilled {size}")
        shutil.rmtree(pruned)
    healed = models / f"healed-{size}"
    if not healed.exists():
        teacher = ModelSpec.from_config(read_config(anchor1)).num_params
        steps = equal_compute_steps(work / "line" / "anchor-02", teacher, ModelSpec.from_config(
            read_config(models / f"plain-{size}")).num_params, config.steps)
        log(f"heal plain {size} from anchor 1, {steps} steps (equal compute)")
        heal(models / f"plain-{size}", anchor1, healed, steps, dataset=DATASET, config=config, resume=True)


def score(work: Path, folder: Path, name: str) -> None:
    target = work / "scores" / f"{name}.json"
    if target.is_file():
        return
    log(f"score {name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(row_losses(folder)))


def run(work: Path, sizes: list[str]) -> None:
    build_chains(work)
    for name in ("plain", "line"):
        score(work, work / name / "anchor-02", f"{name}-anchor2")
    score(work, work / "base" / "anchor-01", "anchor1")
    for size in sizes:  # the cheap arms of every size first: a cut-short run still compares plain and line
        for chain in ("plain", "line"):
            score(work, materialized(work, chain, size), f"{chain}-{size}")
    for size in sizes:
        trained_models(work, size)
        for arm in ("distilled", "healed"):
            score(work, work / "models" / f"{arm}-{size}", f"{arm}-{size}")
    log("done")


# --- the report ------------------------------------------------------------------------------------------------------


def report(work: Path, out: Path) -> None:
    from cbd_engine.evaluation.stats import paired_difference
    from cbd_engine.spec.families import ModelSpec, read_config

    scores = {p.stem: json.loads(p.read_text()) for p in (work / "scores").glob("*.json")}

    def params(folder: Path) -> int:
        return ModelSpec.from_config(read_config(folder)).num_params

    rows = []
    anchors = {"anchor1": params(work / "base" / "anchor-01"), "anchor2": params(work / "plain" / "anchor-02")}
    for name in sorted(scores):
        arm, _, size = name.rpartition("-")
        folder = work / "models" / name if (work / "models" / name).exists() else None
        record = json.loads((folder / "cbd.json").read_text()) if folder else {}
        row = {"model": name, "params": params(folder) if folder else None, "alpha": record.get("alpha"),
               "interpolation_training": (record.get("interpolation_training") or {}).get("kind")}
        for held_out, per_row in scores[name].items():
            row[f"{held_out}_loss"] = round(mean(per_row), 4)
            reference = _reference(name, scores)
            if reference:
                diff, (low, high) = paired_difference(per_row, scores[reference][held_out])
                row[f"{held_out}_vs"] = reference
                row[f"{held_out}_diff"], row[f"{held_out}_low"], row[f"{held_out}_high"] = \
                    round(diff, 4), round(low, 4), round(high, 4)
            if arm in ("plain", "line") and "anchor1" in scores and f"{arm}-anchor2" in scores:
                row[f"{held_out}_straight_line"] = round(_straight_line(
                    row["params"], anchors, mean(scores["anchor1"][held_out]),
                    mean(scores[f"{arm}-anchor2"][held_out])), 4)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in rows for key in row}, key=lambda k: (k != "model", k))
    with open(out / "line_training.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    costs = {name: _cost(work / name / "anchor-02") for name in ("plain", "line")
             if (work / name / "anchor-02" / "metrics.json").is_file()}
    (out / "line_training_cost.json").write_text(json.dumps(costs, indent=1))
    print(json.dumps(rows, indent=1), json.dumps(costs, indent=1), sep="\n")


def _reference(name: str, scores: dict) -> str | None:
    """line's models against plain's, the distilled and healed ones against line's (all at one size); line's anchor
    2 against plain's."""
    arm, _, size = name.rpartition("-")
    wanted = {"line": f"plain-{size}", "distilled": f"line-{size}", "healed": f"line-{size}"}.get(arm)
    if name == "line-anchor2":
        wanted = "plain-anchor2"
    return wanted if wanted in scores else None


def _straight_line(params: int, anchors: dict, loss1: float, loss2: float) -> float:
    """The anchors' losses joined linearly in parameter count, at `params`."""
    t = (params - anchors["anchor2"]) / (anchors["anchor1"] - anchors["anchor2"])
    return loss2 + t * (loss1 - loss2)


def _cost(anchor: Path) -> dict:
    """Seconds per step (mean of the steps' own timings) and in all (the whole stage, evaluation included)."""
    with open(anchor / "loss_curve.csv") as handle:
        steps = [float(row["seconds"]) for row in csv.DictReader(handle) if row.get("seconds")]
    metrics = json.loads((anchor / "metrics.json").read_text())
    total = json.loads((anchor / "seconds.json").read_text())["seconds"] if (anchor / "seconds.json").is_file() \
        else None
    return {"steps": len(steps), "seconds_per_step": sum(steps) / max(len(steps), 1),
            "seconds_training": metrics.get("seconds_this_run"), "seconds_stage": total,
            "validation_loss": metrics["validation_loss"], "dev_loss": metrics["dev_loss"],
            "best_step": metrics["best_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cbd-line"))
    parser.add_argument("--sizes", nargs="+", default=["85M", "78M", "93M"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    args = parser.parse_args()
    log(f"{sys.argv}")
    run(args.work, args.sizes) if args.command == "run" else report(args.work, args.out)


if __name__ == "__main__":
    main()
