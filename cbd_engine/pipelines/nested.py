"""One link of a chain built with nested training (`distillation.interpolation: {"kind": "nested"}`;
cbd_engine.distillation.nested has the method): anchor i, reordered so that every width is a prefix, is trained with
anchor i+1 as its smallest width, written back over anchor i, and anchor i+1 is cut out of it.

Guarantees, for `resume`: every step leaves a state a rerun finishes.
  1. `anchor-NN.nested-start`: anchor i reordered (nested.nested_order), written atomically; same function.
  2. `anchor-NN.nested`: the trained whole, written atomically by distill (checkpoints in `anchor-NN.work`).
  3. its files replace anchor i's one by one, cbd.json last; anchor i's cbd.json then records the link
     (`distillation.nested_training.slice_anchor_index`), and until it does, a rerun replaces them again.
  4. `anchor-NN`: anchor i's first units at anchor i+1's shape, written atomically; metrics.json, written last,
     marks it done (a folder without it is written again).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cbd_engine.data.batches import pad_id_of
from cbd_engine.data.calibration import Calibration
from cbd_engine.distillation.nested import NestedTraining, nested_order, slice_plan
from cbd_engine.distillation.recipe import distill
from cbd_engine.io.atomic import write_text_atomically
from cbd_engine.io.lineage import LINEAGE_FILE, read_lineage
from cbd_engine.materialization.anchor import Anchor, Term
from cbd_engine.materialization.planning import ImportanceSource, lineage_of
from cbd_engine.materialization.stream import iter_tensors, lineage_record, write_model
from cbd_engine.materialization.transforms import Plan, compose
from cbd_engine.nn.device import resolve_device
from cbd_engine.nn.loading import load_model, load_tokenizer
from cbd_engine.nn.validation import examples_loss
from cbd_engine.spec.chain import InterpolationSpec
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import ProgressCallback, no_progress
from cbd_engine.spec.shapes import Shape

if TYPE_CHECKING:  # chain.py imports this module
    from cbd_engine.pipelines.chain import ChainData

CURVE_FILES = ("loss_curve.csv", "loss_curve.png")


def nested_link(index: int, label: str, teacher: Path, start: Path, origin: dict, spec: InterpolationSpec,
                config: DistillConfig, data: ChainData, out: Path, resume: bool, progress: ProgressCallback,
                should_stop: Callable[[], bool] | None) -> Path:
    """Anchor `index` (a folder in `out`) from `start`, its pruned start, by nested training with `teacher`
    (anchor index - 1, rewritten in place). Returns the new anchor's folder."""
    folder = out / f"anchor-{index:02d}"
    whole, whole_start = out / f"anchor-{index:02d}.nested", out / f"anchor-{index:02d}.nested-start"
    smallest = Anchor.load(start).shape
    if _written_back(teacher) != index:
        if not (whole / LINEAGE_FILE).is_file():
            if not (whole_start / LINEAGE_FILE).is_file():
                write_nested_start(teacher, start, whole_start, data.calibration, config.seed)
            training = NestedTraining.build(spec, whole_start, smallest, resolve_device(config.device))
            provenance = {"role": "nested whole", "interpolation": None,
                          "nested_training": {**training.describe(), "slice_anchor_index": index}}
            distill(whole_start, whole_start, data.examples, whole, config, work_dir=out / f"anchor-{index:02d}.work",
                    resume=resume, stage=f"{label}: nested", provenance=provenance, progress=progress,
                    should_stop=should_stop, path=training)
        _own_dev_loss(whole)
        _replace_files(whole, teacher)
    if not (folder / "metrics.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_slice(teacher, folder, start, {"anchor_index": index, **origin}, data, config)
    for leftover in (whole, whole_start, out / f"anchor-{index:02d}.work"):
        shutil.rmtree(leftover, ignore_errors=True)
    return folder


def _written_back(teacher: Path) -> int | None:
    """The anchor whose nested training last wrote `teacher` again (its cbd.json), if any."""
    return ((read_lineage(teacher).get("distillation") or {}).get("nested_training") or {}).get("slice_anchor_index")


def write_nested_start(teacher: Path, start: Path, out: Path, calibration: Calibration, seed: int) -> None:
    """`teacher` with its units in nested order (the ones `start` kept first, the rest by the importance that chose
    them), at `out`; its lineage from its own parent, if it has one, composed with the reordering so that the
    parent pair still aligns unit by unit."""
    large, small = Anchor.load(teacher), Anchor.load(start)
    kept = lineage_of(small, large)
    if kept is None:
        raise ValueError(f"nested training: {start} records no lineage from {teacher}")
    order = nested_order(large.shape, kept, ImportanceSource(calibration)(large, small.shape))
    record = read_lineage(teacher)
    if "lineage" in record:
        record["lineage"] = {**record["lineage"], "plan": compose(Plan.from_dict(record["lineage"]["plan"]),
                                                                  order).to_dict()}
    _write_transformed(Term(large, order), out, large.shape, record, seed)


def write_slice(whole: Path, out: Path, start: Path, record: dict, data: ChainData, config: DistillConfig) -> None:
    """The first units of `whole` at the shape of `start` (the pruned start), with start's records, its lineage (the
    slice's plan and `whole`'s hashes, so that materializing between the two aligns and slices), the training's
    record, and its own validation loss."""
    parent, shape = Anchor.load(whole), Anchor.load(start).shape
    term = Term(parent, slice_plan(parent.shape, shape))
    trained = read_lineage(whole)["distillation"]
    nested = trained["nested_training"]
    provenance = {**read_lineage(start), "lineage": lineage_record(term),
                  "distillation": {**trained, **record, "teacher_anchor_index": record["anchor_index"] - 1,
                                   "interpolation": {key: nested[key] for key in ("kind", "weight", "points")}},
                  "nested": {"slice_of": str(whole), "rule": nested["rule"]}}
    _write_transformed(term, out, shape, provenance, config.seed)
    for name in CURVE_FILES:
        if (whole / name).is_file():
            shutil.copyfile(whole / name, out / name)
    metrics = json.loads((whole / "metrics.json").read_text())
    model = load_model(out, resolve_device(config.device))
    validation = examples_loss(model, data.examples.validation[: config.eval_rows], pad_id_of(load_tokenizer(out)),
                               config.eval_batch_size)
    own = {"validation_loss": validation, "dev_loss": metrics.get("dev_loss_smallest"),
           "best_step": metrics["best_step"], "steps": metrics["steps"],
           "seconds_this_run": metrics["seconds_this_run"], "selected_by": "mean dev loss of the largest and "
                                                                          "smallest widths",
           "whole": {"validation_loss": metrics["validation_loss"], "dev_loss": metrics.get("dev_loss_largest")}}
    (out / "metrics.json").write_text(json.dumps(own, indent=1))


def _write_transformed(term: Term, out: Path, shape: Shape, provenance: dict, seed: int) -> None:
    anchor = term.anchor
    tensors = iter_tensors(lambda spec, name, layer, rows: term.tensor(spec, name, layer, seed, rows), shape, anchor)
    write_model(out, anchor.spec.config_for(shape), anchor, tensors, shape, torch.float32, provenance, no_progress,
                None, None)


def _own_dev_loss(whole: Path) -> None:
    """The whole's `dev_loss` is its own width's; the mean of the widths that kept the checkpoint stays beside it
    (`dev_loss_selection`)."""
    path = whole / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {"dev_loss_selection": None}  # moved already
    if "dev_loss_selection" not in metrics:
        metrics = {**metrics, "dev_loss_selection": metrics["dev_loss"], "dev_loss": metrics.get("dev_loss_largest")}
        write_text_atomically(path, json.dumps(metrics, indent=1))


def _replace_files(new: Path, folder: Path) -> None:
    """`new`'s files take the place of `folder`'s, one rename each, cbd.json last (it says the link is written)."""
    names = sorted(p.name for p in new.iterdir() if p.is_file())
    for name in sorted(names, key=lambda n: n == LINEAGE_FILE):
        os.replace(new / name, folder / name)
