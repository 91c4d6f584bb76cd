"""Building a knowledge chain (paper section 3.2, appendix B) from a POST /chains request body.

The recipe, top to bottom (`build_chain`):
  0. the source becomes anchor 0 (optionally fine-tuned on the data set first, `sft_epochs`)
  1. for each anchor, largest first:
       - its starting point: a given checkpoint (optionally fine-tuned too), or, for a size or shape, the
         predecessor pruned by the materializer's subset transform with activation importance on the data set's
         training rows (prune, then distill, as Minitron does)
       - distilled from its immediate predecessor (reverse KL by default), keeping the best checkpoint by
         validation loss; `distill: false` registers a checkpoint as it is; with `distillation.interpolation`
         the path between the two is trained in the same steps: kind "line" (distillation/interpolation.py), or
         kind "nested" (distillation/nested.py; pipelines/nested.py), which trains anchor i and writes it again,
         anchor i+1 its first units (from the second link on: the source never changes)
  2. each anchor is a Hugging Face folder with metrics.json, loss curves and cbd.json (pruning index maps and
     distillation provenance); chain.json lists them all

Every stage writes its folder atomically and keeps its checkpoints in a `.work` folder beside it, so `resume=True`
skips finished anchors and continues an interrupted stage from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cbd_engine.data.batches import encode_rows, encode_splits, encode_text, pad_id_of
from cbd_engine.data.calibration import Calibration
from cbd_engine.data.rows import Splits, read_dataset_spec, split_rows
from cbd_engine.distillation.interpolation import LineTraining
from cbd_engine.distillation.recipe import distill
from cbd_engine.io.atomic import atomic_output_dir, write_text_atomically
from cbd_engine.io.checkpoint import copy_side_files
from cbd_engine.io.lineage import write_lineage
from cbd_engine.io.sources import resolve_source
from cbd_engine.materialization.recipe import materialize
from cbd_engine.nn.device import resolve_device
from cbd_engine.nn.loading import load_model, load_tokenizer
from cbd_engine.nn.validation import examples_loss
from cbd_engine.pipelines.bridge import generate_responses, generation_cache_dir, init_bridge
from cbd_engine.pipelines.nested import nested_link
from cbd_engine.spec.bridge import BridgeSpec, GenerationParams
from cbd_engine.spec.chain import AnchorSpec, ChainSpec, parse_spec
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.families import ModelSpec, read_config
from cbd_engine.spec.progress import Cancelled, ProgressCallback, no_progress
from cbd_engine.spec.shapes import Shape


@dataclass
class AnchorResult:
    index: int  # 0 = the source (or the bridge)
    path: Path  # a Hugging Face folder: config.json, model.safetensors, tokenizer files, cbd.json
    shape: Shape
    params: int
    metrics: dict  # validation_loss (and, for derived anchors, validation_loss_before etc.)

    def to_dict(self) -> dict:
        return {"index": self.index, "path": str(self.path), "shape": self.shape.to_dict(), "params": self.params,
                "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict) -> AnchorResult:
        return cls(data["index"], Path(data["path"]), Shape(**data["shape"]), data["params"], data["metrics"])


@dataclass
class ChainResult:
    family: str
    anchors: list[AnchorResult] = field(default_factory=list)

# --- the recipe -----------------------------------------------------------------------------------------------------


def build_chain(spec: dict, out: Path, *, resume: bool = False, progress: ProgressCallback = no_progress,
                should_stop: Callable[[], bool] | None = None) -> ChainResult:
    """Build the chain that `spec` (a POST /chains body) describes into `out`; see the module docstring."""
    plan = parse_spec(spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"output folder {out} exists and is not empty (use resume to continue a build)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    config = DistillConfig.from_dict(plan.distillation)

    source_dir = resolve_source(plan.source, out / "source")
    start = source_dir if plan.bridge is None else _bridge_start(plan.bridge, config, out)
    family = ModelSpec.from_config(read_config(start)).family.name
    data = ChainData.load(plan.dataset, start, config)  # the chain's tokenizer: the bridge's, when there is one
    data = data.with_teacher_samples(plan.dataset, source_dir, config, progress, should_stop)
    results = [_anchor_zero(plan, config, data, source_dir, start, out, resume, progress, should_stop)]
    data.calibration.save(results[0].path)
    total = len(plan.anchors)
    for index, anchor in enumerate(plan.anchors, 1):
        _check_stop(should_stop)
        results.append(_build_anchor(index, total, anchor, results[-1], plan, config, data, out, resume, progress,
                                     should_stop))
        results[-2] = _result(results[-2].index, results[-2].path)  # nested training writes the teacher again
        data.calibration.save(results[-1].path)  # every anchor records its calibration (materialize reads it)
        _write_chain_json(out, family, results)
    return ChainResult(family, results)


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("chain build cancelled")


@dataclass
class ChainData:
    """The data set encoded with the chain's tokenizer, by split (training rows train, dev rows choose checkpoints,
    validation rows only report), and the calibration every anchor records (its first training rows and dev rows)."""

    examples: Splits
    calibration: Calibration

    @classmethod
    def load(cls, dataset: dict, tokenizer_dir: Path, config) -> ChainData:
        tokenizer = load_tokenizer(tokenizer_dir)
        rows, text = read_dataset_spec(dataset)
        if rows is not None:
            examples = encode_splits(tokenizer, split_rows(rows), config.prompt_format, config.max_length)
            source = dataset.get("path") or f"hf:{dataset.get('hf')}"
            calibration = Calibration.from_rows(rows, str(source), config.prompt_format)
        else:
            examples = encode_text(tokenizer, text, config.max_length)
            calibration = Calibration.from_texts([tokenizer.decode(e.input_ids) for e in examples.train + examples.dev],
                                                 str(dataset.get("path")))
        if not examples.validation:
            raise ValueError("the data set has no validation rows (sha256 of instruction + input is 0 mod 10)")
        return cls(examples, calibration)

    def with_teacher_samples(self, dataset: dict, source_dir: Path, config, progress: ProgressCallback,
                             should_stop) -> ChainData:
        """`dataset.teacher_samples: N`: N answers of the source to every training prompt join the training rows
        (SeqKD-style data for long budgets), generated once and cached like the bridge's."""
        count = int(dataset.get("teacher_samples") or 0)
        if not count:
            return self
        rows, _ = read_dataset_spec(dataset)
        if rows is None:
            raise ValueError("dataset.teacher_samples: the source answers the data set's prompts, so the data set "
                             "must hold instruction rows")
        params = GenerationParams(responses_per_prompt=count, max_new_tokens=config.max_length // 2,
                                  max_length=config.max_length, seed=config.seed)
        found = generate_responses(source_dir, split_rows(rows).train, params, generation_cache_dir(),
                                   config.prompt_format, device=config.device, stage="teacher samples",
                                   progress=progress, should_stop=should_stop)
        sampled = encode_rows(load_tokenizer(source_dir), found.rows, config.prompt_format, config.max_length)
        return ChainData(Splits(self.examples.train + sampled, self.examples.dev, self.examples.validation),
                         self.calibration)


def _bridge_start(bridge: BridgeSpec, config, out: Path) -> Path:
    """Where the bridge starts, and the chain's tokenizer comes from: its checkpoint, or a fresh init of its shape
    in anchor-00.init; once anchor 0 is built, the bridge itself."""
    if (out / "anchor-00" / "metrics.json").is_file():
        return out / "anchor-00"
    if not bridge.is_shape:
        return resolve_source(bridge.model, out / "bridge")
    init = out / "anchor-00.init"
    if not (init / "config.json").is_file():
        init_bridge(bridge, init, config.seed)
    return init


def _anchor_zero(plan: ChainSpec, config, data: ChainData, source_dir: Path, start: Path, out: Path, resume: bool,
                 progress: ProgressCallback, should_stop) -> AnchorResult:
    """The bridge, trained on the source's answers from `start`; or the source, fine-tuned on the data set when
    sft_epochs > 0, else linked as it is."""
    folder = out / "anchor-00"
    if (folder / "metrics.json").is_file():
        return _result(0, folder)
    if plan.bridge is not None:
        _train_bridge(plan, config, source_dir, start, folder, resume, progress, should_stop)
        shutil.rmtree(out / "anchor-00.init", ignore_errors=True)
    elif plan.sft_epochs > 0:
        _fine_tune(source_dir, folder, plan, config, data, resume, "anchor 0: sft", progress, should_stop)
    else:
        _register(source_dir, folder, config, data, {"role": "source", "source": plan.source})
    return _result(0, folder)


def _build_anchor(index: int, total: int, anchor: AnchorSpec, previous: AnchorResult, plan: ChainSpec, config,
                  data: ChainData, out: Path, resume: bool, progress: ProgressCallback, should_stop,
                  ) -> AnchorResult:
    folder = out / f"anchor-{index:02d}"
    if (folder / "metrics.json").is_file():
        return _result(index, folder)
    label = f"anchor {index}/{total}"
    if anchor.checkpoint is not None:
        start = Path(anchor.checkpoint)
        vocab = ModelSpec.from_config(read_config(start)).shape.vocab_size
        if vocab != previous.shape.vocab_size:
            raise ValueError(f"anchors[{index - 1}].checkpoint has a vocabulary of {vocab}, the chain's is "
                             f"{previous.shape.vocab_size}: anchors of a chain share the source's tokenizer")
        if not anchor.distill:
            _register(start, folder, config, data, {"role": "registered checkpoint", "checkpoint": str(start)})
            return _result(index, folder)
        if plan.sft_epochs > 0:
            sft = out / f"anchor-{index:02d}.sft"
            if not (sft / "metrics.json").is_file():
                _fine_tune(start, sft, plan, config, data, resume, f"{label}: sft", progress, should_stop)
            start = sft
        origin = {"init": "checkpoint", "checkpoint": anchor.checkpoint}
    else:
        start = out / f"anchor-{index:02d}.pruned"
        if not (start / "config.json").is_file():
            _prune(previous.path, start, anchor, data, config, plan.prune_order, label, progress, should_stop)
        origin = {"init": "pruned", "size": anchor.size, "shape": anchor.shape,
                  "prune_order": plan.prune_order if anchor.size is not None else None}
    if _nested(plan, anchor, previous):
        nested_link(index, label, previous.path, start, origin, plan.interpolation, config, data, out, resume,
                    progress, should_stop)
        shutil.rmtree(out / f"anchor-{index:02d}.pruned", ignore_errors=True)
        return _result(index, folder)
    line = _line_training(plan, anchor, previous, start, data, config)
    provenance = {"anchor_index": index, "teacher_anchor_index": previous.index, **origin,
                  "interpolation": line.describe() if line is not None else None}
    distill(previous.path, start, data.examples, folder, config, work_dir=out / f"anchor-{index:02d}.work",
            resume=resume, stage=f"{label}: distill", provenance=provenance, progress=progress,
            should_stop=should_stop, path=line)
    for leftover in (f"anchor-{index:02d}.work", f"anchor-{index:02d}.pruned", f"anchor-{index:02d}.sft"):
        shutil.rmtree(out / leftover, ignore_errors=True)  # the anchor's cbd.json keeps the pruning index maps
    return _result(index, folder)


def _nested(plan: ChainSpec, anchor: AnchorSpec, previous: AnchorResult) -> bool:
    """Nested training applies to an anchor pruned from a chain's anchor after the first: the source (anchor 0)
    never changes, so the first link is distilled as usual, and a checkpoint anchor has no lineage to slice by."""
    return (plan.interpolation is not None and plan.interpolation.kind == "nested" and anchor.checkpoint is None
            and previous.index >= 1)


def _line_training(plan: ChainSpec, anchor: AnchorSpec, previous: AnchorResult, start: Path, data: ChainData,
                   config) -> LineTraining | None:
    """`distillation.interpolation`: the line between the teacher and an anchor pruned from it (a checkpoint anchor
    has no lineage from its teacher to align units by, so its path is not trained)."""
    if plan.interpolation is None or plan.interpolation.kind != "line" or anchor.checkpoint is not None:
        return None
    return LineTraining.build(plan.interpolation, previous.path, start, data.calibration,
                              resolve_device(config.device), config.seed)


def _prune(large: Path, out: Path, anchor: AnchorSpec, data: ChainData, config, prune_order: str, label: str,
           progress: ProgressCallback, should_stop) -> None:
    """The materializer's subset transform with activation importance on the training rows."""
    materialize(out, large=large, size=anchor.size, shape=anchor.shape, calibration=data.calibration,
                prune_order=prune_order,
                dtype="float32", seed=config.seed, progress=_prefixed(progress, f"{label}: prune"),
                should_stop=should_stop)


def _prefixed(progress: ProgressCallback, prefix: str) -> ProgressCallback:
    """The materializer's stages (importance, materialize) as stages of this anchor's pruning."""
    return lambda event: progress(replace(event, stage=f"{prefix} ({event.stage})"))


def _train_bridge(plan: ChainSpec, config, source_dir: Path, start: Path, out: Path, resume: bool,
                  progress: ProgressCallback, should_stop) -> None:
    """SeqKD (bridge.py): the source answers the training prompts, and the dev and validation rows' prompts for
    held-out answers; the bridge learns the answers, in its own tokenizer, by plain cross-entropy."""
    bridge = plan.bridge
    rows, _ = read_dataset_spec(plan.dataset)
    if rows is None:
        raise ValueError("bridge: the source answers the data set's prompts, so dataset must hold instruction rows")
    splits = split_rows(rows)
    asked = {"train": splits.train[: bridge.num_samples], "dev": splits.dev[: config.eval_rows],
             "valid": splits.validation[: config.eval_rows]}
    answers = {name: generate_responses(source_dir, asked[name], bridge.generation, generation_cache_dir(),
                                        config.prompt_format, device=config.device,
                                        stage=f"anchor 0: generate ({name})", progress=progress,
                                        should_stop=should_stop)
               for name in asked}
    tokenizer = load_tokenizer(start)
    examples = Splits(*(encode_rows(tokenizer, answers[name].rows, config.prompt_format, config.max_length)
                        for name in ("train", "dev", "valid")))
    provenance = {"role": "bridge", "method": "seqkd", "source": plan.source, "bridge_model": bridge.model,
                  "epochs": bridge.epochs, "generation": asdict(bridge.generation),
                  "generations": {name: {"cache_key": found.key, **found.stats} for name, found in answers.items()},
                  "validation_set": "the source's answers to the validation rows' prompts (dev rows: to select)"}
    _train_on_responses(start, out, config, examples, bridge.epochs, bridge.learning_rate or config.learning_rate,
                        resume, "anchor 0: bridge", provenance, progress, should_stop)


def _fine_tune(start: Path, out: Path, plan: ChainSpec, config, data: ChainData, resume: bool, stage: str,
               progress: ProgressCallback, should_stop) -> None:
    """SFT on the data set's responses for `sft_epochs` epochs (the paper: 3, lr 1e-5)."""
    _train_on_responses(start, out, config, data.examples, plan.sft_epochs, plan.sft_learning_rate, resume, stage,
                        {"role": "sft", "epochs": plan.sft_epochs}, progress, should_stop)


def _train_on_responses(start: Path, out: Path, config, examples: Splits, epochs: float, learning_rate: float,
                        resume: bool, stage: str, provenance: dict, progress: ProgressCallback, should_stop) -> None:
    """Plain cross-entropy on the training responses for `epochs` epochs, the best by dev loss kept."""


    steps = max(1, math.ceil(epochs * len(examples.train) / config.batch_size))
    ce_config = replace(config, loss="ce", mode="off_policy", ce_weight=0.0, steps=steps, learning_rate=learning_rate)
    distill(None, start, examples, out, ce_config, work_dir=out.with_name(out.name + ".work"), resume=resume,
            stage=stage, provenance=provenance, progress=progress, should_stop=should_stop)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)


def _register(model_dir: Path, out: Path, config, data: ChainData, provenance: dict) -> None:
    """An anchor used as it is: its files linked (or copied) into the chain folder, its validation loss measured."""
    model = load_model(model_dir, resolve_device(config.device))
    loss = examples_loss(model, data.examples.validation[: config.eval_rows], _pad_id(model_dir),
                         config.eval_batch_size)
    del model
    metrics = {"validation_loss": loss}
    with atomic_output_dir(out) as tmp:
        for item in model_dir.glob("model*.safetensors*"):  # weights (and a shard index) are never rewritten: link
            _link_or_copy(item, tmp / item.name)
        shutil.copyfile(model_dir / "config.json", tmp / "config.json")  # small files written later: copy
        copy_side_files(model_dir, tmp)
        write_lineage(model_dir, tmp, "chain", {**provenance, "metrics": metrics})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))


def _pad_id(model_dir: Path) -> int:
    return pad_id_of(load_tokenizer(model_dir))


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _result(index: int, folder: Path) -> AnchorResult:
    spec = ModelSpec.from_config(read_config(folder))
    metrics = json.loads((folder / "metrics.json").read_text())
    return AnchorResult(index, folder, spec.shape, spec.num_params, metrics)


def _write_chain_json(out: Path, family: str, anchors: list[AnchorResult]) -> None:
    data = {"family": family, "anchors": [anchor.to_dict() for anchor in anchors]}
    write_text_atomically(out / "chain.json", json.dumps(data, indent=1))


def read_chain(out: Path) -> ChainResult:
    data = json.loads((Path(out) / "chain.json").read_text())
    return ChainResult(data["family"], [AnchorResult.from_dict(a) for a in data["anchors"]])

