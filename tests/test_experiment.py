"""`cbd experiment`: a tiny grid end to end (chains, interpolated models, a training run, evaluation, report),
resumed in stages without redoing finished units."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import DOLLY, SHARED_DATA
from distill_helpers import tiny_with_tokenizer

from cbd_engine.pipelines.experiment import plan_experiment, run_experiment

SHAPE = {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
         "intermediate_size": 64}
SMALLER = {**SHAPE, "num_layers": 1, "intermediate_size": 32}
FAST = {"steps": 3, "batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 6, "device": "cpu"}
ARC = SHARED_DATA / "multiple_choice" / "arc_easy_test.jsonl"
UINST = SHARED_DATA / "instruction" / "minillm_uinst_valid.jsonl"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_with_tokenizer(tmp_path_factory.mktemp("experiment") / "source", seed=3, num_hidden_layers=3,
                               hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def _chain(source, anchors: list[dict]) -> dict:
    return {"source": str(source), "bridge": None, "anchors": anchors, "device": "cpu",
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"}, "distillation": FAST}


def _chains(source) -> dict:
    return {"stepwise": _chain(source, [{"shape": SHAPE}, {"shape": SMALLER}]),
            "direct": _chain(source, [{"shape": SMALLER}])}


def _grid(source, out) -> dict:
    anchors = json.loads((out / "chains" / "stepwise" / "chain.json").read_text())["anchors"]
    small, large = anchors[2]["params"], anchors[1]["params"]
    middle = (small + large) // 2
    return {
        "name": "tiny", "seed": 0, "chains": _chains(source),
        "interpolate": {"chain": "stepwise", "between": [1, 2], "sizes": [middle, (middle + large) // 2],
                        "variants": {"auto": {}, "alpha0": {"alpha": 0}, "random": {"init": "random"},
                                     "single": {"init": "single"}},
                        "heal_steps": [0, 2],
                        "alpha_sweep": {"size": middle, "alphas": [0.5, 1], "mixes": ["unit", "paper"]}},
        "direct": {"chain": "stepwise", "steps": 2},
        "two_by_two": {"chain": "stepwise", "anchor": 2, "steps": 2},
        "training": {"data": str(DOLLY), "budgets": [1500], "runs": [{"model": "random-" + f"{middle / 1e6:g}M"}],
                     "settings": {"batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_every": 2,
                                  "eval_rows": 6, "device": "cpu"}},
        "evaluation": {"tasks": [f"multiple_choice={ARC}"], "limit": 4, "batch_size": 4, "max_length": 128,
                       "validation_max_length": 64, "device": "cpu", "held_out": [str(UINST)]},
    }


def test_plan_names_every_model_and_rejects_bad_fields(source, tmp_path):
    with pytest.raises(ValueError, match="unknown experiment fields"):
        plan_experiment({"chains": _chains(source), "grid": {}}, tmp_path)
    with pytest.raises(ValueError, match="interpolate.chain"):
        plan_experiment({"chains": _chains(source), "interpolate": {"chain": "other", "sizes": [1]}}, tmp_path)
    spec = {"chains": _chains(source),
            "interpolate": {"chain": "stepwise", "sizes": ["1M"],
                            "variants": {"auto": {}, "random": {"init": "random"}},
                            "heal_steps": [0, 30], "alpha_sweep": {"size": "1M", "alphas": [0.5]}},
            "direct": {"chain": "stepwise", "steps": 10}, "two_by_two": {"chain": "stepwise", "steps": 5},
            "training": {"data": str(DOLLY), "budgets": [100, 200], "runs": [{"model": "random-1M"}]}}
    ids = [unit.id for unit in plan_experiment(spec, tmp_path).models]
    assert ids == ["stepwise-anchor0", "stepwise-anchor1", "stepwise-anchor2", "direct-anchor0", "direct-anchor1",
                   "auto-1M", "random-1M", "auto-1M+heal30", "random-1M+heal30", "sweep-unit-1M-a0.5", "direct-1M",
                   "2x2-init_anchor-teacher_anchor", "2x2-init_anchor-teacher_source",
                   "2x2-init_source-teacher_anchor", "2x2-init_source-teacher_source",
                   "random-1M+100tok", "random-1M+200tok"]
    own_sizes = {**spec, "direct": {**spec["direct"], "sizes": ["2M"]}}
    assert [u.id for u in plan_experiment(own_sizes, tmp_path).models if u.kind == "direct"] == ["direct-2M"]
    only_auto = {**spec, "interpolate": {**spec["interpolate"], "heal_variants": ["auto"]}}
    healed = [unit.id for unit in plan_experiment(only_auto, tmp_path).models if unit.kind == "healed"]
    assert healed == ["auto-1M+heal30"]
    with pytest.raises(ValueError, match="heal_variants"):
        plan_experiment({**spec, "interpolate": {**spec["interpolate"], "heal_variants": ["nope"]}}, tmp_path)
    with pytest.raises(ValueError, match="training.runs"):
        plan_experiment({**spec, "training": {**spec["training"], "runs": [{"model": "nope"}]}}, tmp_path)


def test_grid_runs_reports_and_resumes(source, tmp_path):
    out = tmp_path / "experiment"
    run_experiment({"name": "tiny", "chains": _chains(source)}, out, log=lambda _: None)  # stage 1: chains only
    anchor = out / "chains" / "stepwise" / "anchor-02" / "model.safetensors"
    built = anchor.stat().st_mtime_ns
    spec = _grid(source, out)
    (out / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "cbd_cli", "experiment", str(out / "spec.json"), "--out", str(out)],
                   check=True, capture_output=True)
    assert anchor.stat().st_mtime_ns == built  # the finished chain was not rebuilt

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    plan = plan_experiment(spec, out)
    assert {row["model"] for row in rows} == {unit.id for unit in plan.models}
    losses = {row["model"]: float(row["value"]) for row in rows if row["task"] == "validation_loss"}
    accuracy = [row for row in rows if row["metric"] == "acc_norm"]
    assert len(accuracy) == len(plan.models) and all(0 <= float(r["value"]) <= 1 for r in accuracy)
    trained = next(unit for unit in plan.models if unit.kind == "trained")
    assert losses[trained.id] < losses[trained.base]  # training lowered the random init's loss
    alphas = {row["model"]: row["alpha"] for row in rows if row["task"] == "validation_loss"}
    swept = [unit for unit in plan.models if unit.init.startswith("sweep-")]
    assert {float(alphas[unit.id]) for unit in swept} == {0.5, 1.0}
    healed = [unit for unit in plan.models if unit.kind == "healed"]
    assert len(healed) == 8 and all(json.loads((u.path / "cbd.json").read_text())["distillation"]["role"] == "heal"
                                    for u in healed)
    held_out = [row for row in rows if row["task"] == "held_out:minillm_uinst_valid"]
    assert len(held_out) == len(plan.models)  # the second held-out set, for every model
    report = (out / "results.md").read_text()
    for heading in ("Table 1 analogue", "Interpolation between two anchors", "Table 5 analogue",
                    "Figure 4 analogue", "Figure 6 analogue", "the two causes apart"):
        assert heading in report
    assert "vs alpha0" in report and "[" in report.split("Interpolation between two anchors")[1]
    sweep = report.split("Figure 6 analogue")[1].split("\n## ")[0]
    middle = f"{spec['interpolate']['alpha_sweep']['size'] / 1e6:g}M"
    unit_line = next(line for line in sweep.splitlines() if line.startswith(f"| {middle} | unit |"))
    alpha_0 = f"{losses[f'alpha0-{middle}']:.3f}"  # the alpha0 variant is the unit mix's point at 0
    assert unit_line.split(" | ")[2] == alpha_0 and "| alpha 0 | alpha 0.5 | alpha 1 |" in sweep
    assert "cbd experiment" in report  # the exact command is recorded
    for plot in ("figure4_loss_curves.png", "figure6_alpha_sweep.png", "score_vs_size.png"):
        assert (out / plot).stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and f"trained {trained.id}" in manifest["units"]

    evaluated = (out / "evals" / f"{trained.id}.json").stat().st_mtime_ns
    missing = plan.models[6].id
    (out / "evals" / f"{missing}.json").unlink()
    messages = []
    run_experiment(spec, out, log=messages.append)
    assert [message.split(":")[0] for message in messages] == [f"evaluate {missing}"]  # only the missing unit
    assert (out / "evals" / f"{trained.id}.json").stat().st_mtime_ns == evaluated
