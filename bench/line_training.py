"""Chains trained to be interpolated (issue 20), measured on this CPU (docs/RESULTS.md, "Line training" and
"Nested training").

    PYTHONPATH=. .venv/bin/python bench/line_training.py run --work /tmp/cbd-line [settings]
    PYTHONPATH=. .venv/bin/python bench/line_training.py report --work /tmp/cbd-line --out docs/results

One link of RESULTS.md's chain built from the same pruned start without and with `distillation.interpolation`:
`plain`, `line` ({"kind": "line"}) or `nested` ({"kind": "nested"}). The teacher is anchor i (the source,
SmolLM2-135M-Instruct, or RESULTS' anchor 1 with --pair anchors) and the student is pruned from it (anchor i+1: 100M,
or 70M), distilled with the recipe's defaults for --steps steps of 4 rows. The prune is deterministic and its
importance cached, so the pruned start is the same. Nested training leaves the source alone, so with --pair anchors
the nested chain's first link is the plain chain's, copied. Then, per size between the two anchors:
  plain / line / nested   the size materialized from each chain (line, plain: unit mix, --alpha: auto or
                          proportional; nested: the slice), no training;
  distilled               the teacher pruned to the size's shape and distilled from it for the chain's steps
                          (--baseline-sizes): what a new anchor at that size costs;
  healed                  plain's model distilled from the teacher for K steps, K the --compare chain's extra passes
                          counted in heal steps (`equal_compute_steps`): the best initialization at equal compute.
`--chains` and `--arms` split the work between processes (a nested chain waits for plain's first link). Every model
is scored per row on the first --rows validation rows of each --held-out set; `report --compare KIND` writes the means
and the paired differences with 95% bootstrap intervals (cbd_engine.evaluation.stats) to KIND_training.csv. Units
whose output exists are skipped: rerun to resume. RESULTS.md's full budget is the defaults with --pair anchors
--steps 60 --max-length 256 --importance-rows 256 --eval-rows 200 --eval-every 20 --rows 0 --alpha auto --held-out
dolly uinst --sizes 78M 85M 93M --baseline-sizes 78M 85M 93M.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from quality import HELD_OUT, mean

DATASET = {"path": str(HELD_OUT["dolly"]), "prompt_format": "alpaca"}
LINE = {"kind": "line", "weight": 1.0, "points": 4}
NESTED = {"kind": "nested", "weight": 1.0}
TRAINED = {"line": LINE, "nested": NESTED}  # the chains besides "plain", by their distillation.interpolation


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def chain_spec(args, kind: str) -> dict:
    anchors = [{"size": "100M"}] if args.pair == "source" else [{"size": "100M"}, {"size": "70M"}]
    distillation = {"steps": args.steps, "batch_size": 4, "max_length": args.max_length, "seed": 0,
                    "eval_every": args.eval_every, "eval_rows": args.eval_rows,
                    **({"interpolation": TRAINED[kind]} if kind in TRAINED else {})}
    return {"source": "zoo:smollm2-135m-instruct", "bridge": None, "anchors": anchors, "dataset": DATASET,
            "distillation": distillation, "device": "cpu"}


def limit_importance_rows(rows: int) -> None:
    """The chain's calibration ranks units on its first `rows` training rows (the engine's default: 256). Here only
    to fit the CPU's time; both chains and every materialization read the same calibration (calibration.json)."""
    from cbd_engine.data.calibration import Calibration

    original = Calibration.from_rows.__func__

    def from_rows(cls, rows_, source, prompt_format="alpaca", importance_rows=rows, **kwargs):
        return original(cls, rows_, source, prompt_format, importance_rows, **kwargs)

    Calibration.from_rows = classmethod(from_rows)


def teacher_and_student(work: Path, chain: str, args) -> tuple[Path, Path]:
    index = 0 if args.pair == "source" else 1
    return work / chain / f"anchor-{index:02d}", work / chain / f"anchor-{index + 1:02d}"


def teacher_name(chain: str, args) -> str:
    """The source teaches both chains' first link ("teacher"); with --pair anchors each chain has its own anchor 1
    (line training shapes it too)."""
    return "teacher" if args.pair == "source" else f"{chain}-teacher"


def build_chain_once(work: Path, name: str, args) -> None:
    """`name`'s chain (plain, line or nested), unless built. Nested training starts at the second link (the source
    never changes), so with --pair anchors the nested chain's first link is the plain chain's, copied once built."""
    from cbd_engine.pipelines.chain import build_chain

    folder = work / name
    student = teacher_and_student(work, name, args)[1]
    if (student / "metrics.json").is_file():
        return
    if name == "nested" and args.pair == "anchors":
        _first_link_of_plain(work, folder)
    log(f"chain {name}")
    started = time.monotonic()
    build_chain(chain_spec(args, name), folder, resume=True, progress=_progress())
    (student / "seconds.json").write_text(json.dumps({"seconds": time.monotonic() - started}))


def _first_link_of_plain(work: Path, folder: Path) -> None:
    """The plain chain's anchors 0 and 1 (the same spec up to anchor 1, deterministic on CPU), waited for."""
    import shutil

    plain = work / "plain"
    while not (plain / "anchor-01" / "metrics.json").is_file():
        time.sleep(30)
    for anchor in ("anchor-00", "anchor-01"):
        if not (folder / anchor).exists():
            shutil.copytree(plain / anchor, folder / anchor)


def _progress():
    last = {"stage": None}

    def show(event) -> None:
        if event.stage != last["stage"] or event.step == event.total or event.step % 5 == 0:
            log(f"{event.stage} {event.step}/{event.total} loss {event.loss}")
        last["stage"] = event.stage

    return show


def materialized(work: Path, chain: str, size: str, args) -> Path:
    """The size from `chain`'s two anchors (unit mix, --alpha), no training."""
    from cbd_engine.materialization.recipe import materialize

    teacher, student = teacher_and_student(work, chain, args)
    out = work / "models" / f"{chain}-{size}"
    if not out.exists():
        log(f"materialize {chain} {size}")
        materialize(out, small=student, large=teacher, size=size, alpha=args.alpha, dtype="float32")
    return out


def equal_compute_steps(teacher: Path, student: Path, size_params: int, steps: int, kind: str = "line") -> int:
    """Heal steps whose passes equal the trained path's extra ones. A line step adds a forward and backward of the
    mixed model (about 3 x its parameters in multiply-adds per token; the mean of the line's target sizes); a nested
    step adds the teacher's own forward and backward and a random width's (its mean size: the anchors' mean), the
    smallest width's standing for the plain student's; a heal step is a teacher forward (1 x) and a student forward
    and backward (3 x)."""
    from cbd_engine.spec.chain import InterpolationSpec
    from cbd_engine.spec.families import ModelSpec, read_config
    from cbd_engine.spec.shapes import solve_shape

    large, small = ModelSpec.from_config(read_config(teacher)), ModelSpec.from_config(read_config(student))
    if kind == "nested":
        extra = 3 * large.num_params + 3 * (large.num_params + small.num_params) / 2
        return round(steps * extra / (large.num_params + 3 * size_params))
    arch = large.architecture
    sizes = [arch.num_params(solve_shape(arch, small.shape, large.shape,
                                         round(small.num_params + f * (large.num_params - small.num_params))))
             for f in InterpolationSpec(**{k: v for k, v in LINE.items() if k != "weight"}).fractions()]
    return round(steps * 3 * (sum(sizes) / len(sizes)) / (large.num_params + 3 * size_params))


def trained_models(work: Path, size: str, args) -> None:
    """distilled and healed at `size` (the module docstring)."""
    from cbd_engine.distillation.recipe import distill
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.pipelines.heal import heal
    from cbd_engine.spec.chain import distillation_settings
    from cbd_engine.spec.distill_config import DistillConfig
    from cbd_engine.spec.families import ModelSpec, read_config
    from cbd_engine.spec.shapes import parse_size, solve_shape

    teacher, student = teacher_and_student(work, "plain", args)
    models = work / "models"
    config = DistillConfig.from_dict(distillation_settings(chain_spec(args, "plain")))
    distilled = models / f"distilled-{size}"
    if "distilled" in args.arms and not distilled.exists():
        data = ChainData.load(DATASET, teacher, config)
        pruned = models / f"distilled-{size}.pruned"
        if not pruned.exists():  # the size's shape between the anchors, cut from the teacher as the chain cuts one
            large, small = (ModelSpec.from_config(read_config(folder)) for folder in (teacher, student))
            shape = solve_shape(large.architecture, small.shape, large.shape, parse_size(size))
            materialize(pruned, large=teacher, shape=shape, calibration=data.calibration, dtype="float32")
        log(f"distill {size} from the teacher, {config.steps} steps")
        distill(teacher, pruned, data.examples, distilled, config, resume=True, stage=f"distilled {size}")
    healed = models / f"healed-{args.compare}-{size}"
    if "healed" in args.arms and not healed.exists():
        plain = materialized(work, "plain", size, args)
        steps = equal_compute_steps(teacher, teacher_and_student(work, "plain", args)[1],
                                    ModelSpec.from_config(read_config(plain)).num_params, config.steps, args.compare)
        log(f"heal plain {size} from the teacher, {steps} steps (compute equal to {args.compare})")
        heal(plain, teacher, healed, steps, dataset=DATASET, config=config, resume=True)


def score(work: Path, folder: Path, name: str, args) -> None:
    """Per-row (loss sum, tokens) on the first --rows validation rows of each --held-out set."""
    from cbd_engine.data.batches import encode_rows, pad_id_of
    from cbd_engine.data.rows import read_instruction_rows, split_rows
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import example_losses

    target = work / "scores" / f"{name}.json"
    if target.is_file():
        return
    log(f"score {name}")
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    result = {}
    for held_out in args.held_out:
        rows = split_rows(read_instruction_rows(HELD_OUT[held_out])).validation[: args.rows or None]
        examples = encode_rows(tokenizer, rows, max_length=args.score_length)
        result[held_out] = example_losses(model, examples, pad_id_of(tokenizer))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result))


def run(work: Path, args) -> None:
    """Each of --chains with its materialized sizes, then the baselines (of plain's chain). Two processes can share
    the work: `run --chains plain` and `run --chains line --baseline-sizes`."""
    limit_importance_rows(args.importance_rows)
    for name in args.chains:
        build_chain_once(work, name, args)
        teacher, student = teacher_and_student(work, name, args)
        score(work, student, f"{name}-student", args)
        score(work, teacher, teacher_name(name, args), args)
        for size in args.sizes:
            score(work, materialized(work, name, size, args), f"{name}-{size}", args)
    for size in args.baseline_sizes:
        trained_models(work, size, args)
        for arm in args.arms:
            name = f"healed-{args.compare}-{size}" if arm == "healed" else f"{arm}-{size}"
            score(work, work / "models" / name, name, args)
    log("done")


# --- the report ------------------------------------------------------------------------------------------------------


def report(work: Path, out: Path, args) -> None:
    from cbd_engine.evaluation.stats import paired_difference
    from cbd_engine.spec.families import ModelSpec, read_config

    scores = {p.stem: json.loads(p.read_text()) for p in (work / "scores").glob("*.json")}
    teacher, student = teacher_and_student(work, "plain", args)

    def params(folder: Path) -> int:
        return ModelSpec.from_config(read_config(folder)).num_params

    ends = {"teacher": params(teacher), "student": params(student)}
    compare = args.compare
    anchors = {"teacher": teacher, "plain-teacher": teacher, "plain-student": student,
               f"{compare}-teacher": teacher_and_student(work, compare, args)[0],
               f"{compare}-student": teacher_and_student(work, compare, args)[1]}
    rows = []
    for name in sorted(n for n in scores if n.rpartition("-")[0] in ("", "plain", compare, "distilled",
                                                                       f"healed-{compare}")):
        arm, _, size = name.rpartition("-")
        anchor = anchors.get(name)
        folder = anchor or work / "models" / name
        record = json.loads((folder / "cbd.json").read_text()) if anchor is None else {}
        row = {"model": name, "params": params(folder), "alpha": record.get("alpha"),
               "interpolation_training": (record.get("interpolation_training") or {}).get("kind")}
        for held_out, per_row in scores[name].items():
            row[f"{held_out}_loss"] = round(mean(per_row), 4)
            reference = _reference(name, scores, compare)
            if reference:
                diff, (low, high) = paired_difference(per_row, scores[reference][held_out])
                row[f"{held_out}_vs"] = reference
                row[f"{held_out}_diff"], row[f"{held_out}_low"], row[f"{held_out}_high"] = \
                    round(diff, 4), round(low, 4), round(high, 4)
            if arm in ("plain", compare) and anchor is None and f"{arm}-student" in scores:
                row[f"{held_out}_straight_line"] = round(_straight_line(
                    row["params"], ends, mean(scores[teacher_name(arm, args)][held_out]),
                    mean(scores[f"{arm}-student"][held_out])), 4)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in rows for key in row}, key=lambda k: (k != "model", k))
    with open(out / f"{compare}_training.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    costs = {name: _cost(teacher_and_student(work, name, args)[1]) for name in ("plain", compare)}
    costs.update({name: _cost(work / "models" / name) for name in sorted(scores)
                  if name.startswith(("distilled-", f"healed-{compare}-"))})
    (out / f"{compare}_training_cost.json").write_text(json.dumps(costs, indent=1))
    print(json.dumps(rows, indent=1), json.dumps(costs, indent=1), sep="\n")


def _reference(name: str, scores: dict, compare: str) -> str | None:
    """The trained chain's models (and anchors) against plain's, the distilled and healed ones against the trained
    chain's (one size)."""
    arm, _, size = name.rpartition("-")
    wanted = {compare: f"plain-{size}", "distilled": f"{compare}-{size}",
              f"healed-{compare}": f"{compare}-{size}"}.get(arm)
    return wanted if wanted in scores else None


def _straight_line(params: int, ends: dict, teacher_loss: float, student_loss: float) -> float:
    """The two anchors' losses joined linearly in parameter count, at `params`."""
    t = (params - ends["student"]) / (ends["teacher"] - ends["student"])
    return student_loss + t * (teacher_loss - student_loss)


def _cost(folder: Path) -> dict:
    """Seconds per step (the steps' own timings) and of the whole stage (evaluation included), and the losses."""
    with open(folder / "loss_curve.csv") as handle:
        steps = [float(row["seconds"]) for row in csv.DictReader(handle) if row.get("seconds")]
    metrics = json.loads((folder / "metrics.json").read_text())
    stage = folder / "seconds.json"
    return {"steps": len(steps), "seconds_per_step": round(sum(steps) / max(len(steps), 1), 2),
            "seconds_training": round(metrics.get("seconds_this_run") or 0, 1),
            "seconds_chain": round(json.loads(stage.read_text())["seconds"], 1) if stage.is_file() else None,
            "validation_loss": metrics["validation_loss"], "dev_loss": metrics["dev_loss"],
            "best_step": metrics["best_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "chain", "report"))
    parser.add_argument("--chains", nargs="*", default=["plain", "line"], choices=("plain", "line", "nested"),
                        help="the chains this process builds")
    parser.add_argument("--compare", choices=sorted(TRAINED), default="line",
                        help="the trained chain the baselines are compared with (and the heal's compute matches)")
    parser.add_argument("--arms", nargs="+", default=["distilled", "healed"], choices=("distilled", "healed"),
                        help="the baselines this process makes at --baseline-sizes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cbd-line"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    parser.add_argument("--pair", choices=("source", "anchors"), default="source",
                        help="source: the source and a 100M anchor; anchors: RESULTS' anchors 1 and 2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=16, help="dev rows that choose each run's checkpoint")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: before, after)")
    parser.add_argument("--importance-rows", type=int, default=32)
    parser.add_argument("--alpha", default="proportional")
    parser.add_argument("--sizes", nargs="+", default=["110M", "118M", "126M"])
    parser.add_argument("--baseline-sizes", nargs="*", default=["118M"])
    parser.add_argument("--held-out", nargs="+", default=["dolly"], choices=sorted(HELD_OUT))
    parser.add_argument("--rows", type=int, default=50, help="validation rows scored per set (0: all)")
    parser.add_argument("--score-length", type=int, default=128)
    args = parser.parse_args()
    log(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    if args.command == "chain":  # build --chains alone
        limit_importance_rows(args.importance_rows)
        for name in args.chains:
            build_chain_once(args.work, name, args)
    else:
        run(args.work, args) if args.command == "run" else report(args.work, args.out, args)


if __name__ == "__main__":
    main()
