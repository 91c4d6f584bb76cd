"""Building a knowledge chain (paper section 3.2, appendix B) from a POST /chains request body.

The recipe, top to bottom (`build_chain`):
  0. the source becomes anchor 0 (optionally fine-tuned on the data set first, `sft_epochs`)
  1. for each anchor, largest first:
       - its starting point: a given checkpoint (optionally fine-tuned too), or, for a size or shape, the
         predecessor pruned by the materializer's subset transform with activation importance on the data set's
         training rows (prune, then distill, as Minitron does)
       - distilled from its immediate predecessor (reverse KL by default), keeping the best checkpoint by
         validation loss; `distill: false` registers a checkpoint as it is
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cbd_engine.bridge import BridgeSpec, generate_responses, generation_cache_dir, init_bridge, planned_spec
from cbd_engine.calibration import Calibration
from cbd_engine.data import Splits
from cbd_engine.distill_config import DistillConfig
from cbd_engine.families import ModelSpec
from cbd_engine.files import write_text_atomically
from cbd_engine.progress import Cancelled, ProgressCallback, no_progress
from cbd_engine.shapes import PRUNE_ORDER, PRUNE_ORDERS, Shape, ShapeError, parse_size

SFT_LEARNING_RATE = 1e-5  # the paper's fine-tuning rate (appendix B)
CHAIN_ONLY_KEYS = ("sft_epochs", "sft_learning_rate", "prune_order")  # chain settings beside DistillConfig's


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


@dataclass(frozen=True)
class AnchorSpec:
    size: int | None = None
    shape: dict | None = None
    checkpoint: str | None = None
    distill: bool = True

    @classmethod
    def parse(cls, index: int, data: dict) -> AnchorSpec:
        where = f"anchors[{index}]"
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object with one of size, shape, checkpoint")
        unknown = sorted(set(data) - {"size", "shape", "checkpoint", "distill"})
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}; allowed: size, shape, checkpoint, distill")
        given = [key for key in ("size", "shape", "checkpoint") if data.get(key) is not None]
        if len(given) != 1:
            raise ValueError(f"{where} needs exactly one of size, shape, checkpoint (got {given or 'none'})")
        distill = bool(data.get("distill", True))
        if not distill and "checkpoint" not in given:
            raise ValueError(f"{where}.distill=false only registers a checkpoint; a size or shape must be distilled")
        size = parse_size(data["size"]) if "size" in given else None
        return cls(size, data.get("shape"), data.get("checkpoint"), distill)


@dataclass(frozen=True)
class ChainPlan:
    source: str
    anchors: list[AnchorSpec]
    dataset: dict
    distillation: dict  # every DistillConfig field
    sft_epochs: float
    sft_learning_rate: float
    bridge: BridgeSpec | None = None  # a SeqKD bridge replaces the source as anchor 0
    prune_order: str = PRUNE_ORDER  # how an anchor given by size is cut from its predecessor (shapes.PRUNE_ORDERS)


def distillation_settings(spec: dict) -> dict:
    """Every DistillConfig setting of a POST /chains body, the recipe's defaults filled in (torch-free; no data set
    needed: a registered chain's models heal with these)."""
    given = {key: value for key, value in (spec.get("distillation") or {}).items()
             if value is not None and key not in CHAIN_ONLY_KEYS}
    if spec.get("device"):
        given["device"] = spec["device"]
    given.setdefault("prompt_format", (spec.get("dataset") or {}).get("prompt_format", "alpaca"))
    return asdict(DistillConfig.from_dict(given))


def parse_spec(spec: dict) -> ChainPlan:
    """Check a POST /chains body; every error names the field."""
    if not isinstance(spec, dict):
        raise ValueError("the chain spec must be a JSON object")
    if not spec.get("source"):
        raise ValueError("source is required: a Hugging Face id, a local model folder or a .gguf file")
    anchors = spec.get("anchors")
    if not isinstance(anchors, list) or not anchors:
        raise ValueError("anchors must be a non-empty list")
    dataset = spec.get("dataset") or {}
    if not (dataset.get("path") or dataset.get("hf")):
        raise ValueError("dataset needs path (JSONL or text file) or hf (a data set id)")
    samples = dataset.get("teacher_samples") or 0
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"dataset.teacher_samples must be a whole number >= 0, got {samples!r}")
    if samples and spec.get("bridge") is not None:
        raise ValueError("dataset.teacher_samples: a bridge trains on the source's answers already")
    distillation = distillation_settings(spec)
    chain_only = {key: value for key, value in (spec.get("distillation") or {}).items()
                  if key in CHAIN_ONLY_KEYS and value is not None}
    sft_epochs = float(chain_only.get("sft_epochs", 0) or 0)
    if sft_epochs < 0:
        raise ValueError(f"distillation.sft_epochs must be >= 0, got {sft_epochs}")
    bridge = BridgeSpec.parse(spec["bridge"], distillation["max_length"]) if spec.get("bridge") is not None else None
    if bridge is not None and sft_epochs:
        raise ValueError("distillation.sft_epochs fine-tunes the source, which the bridge replaces as anchor 0: "
                         "fine-tune the source beforehand (as appendix B does) and give sft_epochs 0")
    prune_order = chain_only.get("prune_order", PRUNE_ORDER)
    if prune_order not in PRUNE_ORDERS:
        raise ValueError(f"distillation.prune_order must be one of {', '.join(PRUNE_ORDERS)}, got {prune_order!r}")
    return ChainPlan(str(spec["source"]), [AnchorSpec.parse(i, a) for i, a in enumerate(anchors)], dataset,
                     distillation, sft_epochs, float(chain_only.get("sft_learning_rate", SFT_LEARNING_RATE)), bridge,
                     prune_order)


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
        data.calibration.save(results[-1].path)  # every anchor records its calibration (materialize reads it)
        _write_chain_json(out, family, results)
    return ChainResult(family, results)


def read_config(folder: str | Path) -> dict:
    from cbd_engine.checkpoint import read_config as read

    return read(folder)


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
        from cbd_engine.batches import encode_splits, encode_text
        from cbd_engine.data import read_dataset_spec, split_rows
        from cbd_engine.models import load_tokenizer

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
        from cbd_engine.batches import encode_rows
        from cbd_engine.bridge import GenerationParams
        from cbd_engine.data import read_dataset_spec, split_rows
        from cbd_engine.models import load_tokenizer

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


def resolve_source(source: str, cache: Path) -> Path:
    """A local folder as it is; a zoo model ("zoo:<name>" or its Hub id, cbd_engine.zoo) fetched offline; a .gguf
    file or another Hugging Face id converted once into `cache`."""
    from cbd_engine.checkpoint import atomic_output_dir
    from cbd_engine.zoo import zoo_entry

    zoo = zoo_entry(source)
    if zoo is not None:
        return zoo.fetch()
    path = Path(source)
    if path.is_dir():
        read_config(path)
        return path
    if (cache / "config.json").is_file():
        return cache
    if path.suffix == ".gguf":
        from cbd_engine.gguf_import import import_gguf

        return import_gguf(path, cache)
    if path.exists() or source.startswith(("/", ".")):
        raise FileNotFoundError(f"source {source} is neither a model folder, a .gguf file nor a Hugging Face id")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with atomic_output_dir(cache) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cache


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


def _anchor_zero(plan: ChainPlan, config, data: ChainData, source_dir: Path, start: Path, out: Path, resume: bool,
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


def _build_anchor(index: int, total: int, anchor: AnchorSpec, previous: AnchorResult, plan: ChainPlan, config,
                  data: ChainData, out: Path, resume: bool, progress: ProgressCallback, should_stop,
                  ) -> AnchorResult:
    from cbd_engine.distill import distill

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
    provenance = {"anchor_index": index, "teacher_anchor_index": previous.index, **origin}
    distill(previous.path, start, data.examples, folder, config, work_dir=out / f"anchor-{index:02d}.work",
            resume=resume, stage=f"{label}: distill", provenance=provenance, progress=progress,
            should_stop=should_stop)
    for leftover in (f"anchor-{index:02d}.work", f"anchor-{index:02d}.pruned", f"anchor-{index:02d}.sft"):
        shutil.rmtree(out / leftover, ignore_errors=True)  # the anchor's cbd.json keeps the pruning index maps
    return _result(index, folder)


def _prune(large: Path, out: Path, anchor: AnchorSpec, data: ChainData, config, prune_order: str, label: str,
           progress: ProgressCallback, should_stop) -> None:
    """The materializer's subset transform with activation importance on the training rows."""
    from cbd_engine.materialize import materialize

    materialize(out, large=large, size=anchor.size, shape=anchor.shape, calibration=data.calibration,
                prune_order=prune_order,
                dtype="float32", seed=config.seed, progress=_prefixed(progress, f"{label}: prune"),
                should_stop=should_stop)


def _prefixed(progress: ProgressCallback, prefix: str) -> ProgressCallback:
    """The materializer's stages (importance, materialize) as stages of this anchor's pruning."""
    from dataclasses import replace

    return lambda event: progress(replace(event, stage=f"{prefix} ({event.stage})"))


def _train_bridge(plan: ChainPlan, config, source_dir: Path, start: Path, out: Path, resume: bool,
                  progress: ProgressCallback, should_stop) -> None:
    """SeqKD (bridge.py): the source answers the training prompts, and the dev and validation rows' prompts for
    held-out answers; the bridge learns the answers, in its own tokenizer, by plain cross-entropy."""
    from cbd_engine.batches import encode_rows
    from cbd_engine.data import read_dataset_spec, split_rows
    from cbd_engine.models import load_tokenizer

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


def _fine_tune(start: Path, out: Path, plan: ChainPlan, config, data: ChainData, resume: bool, stage: str,
               progress: ProgressCallback, should_stop) -> None:
    """SFT on the data set's responses for `sft_epochs` epochs (the paper: 3, lr 1e-5)."""
    _train_on_responses(start, out, config, data.examples, plan.sft_epochs, plan.sft_learning_rate, resume, stage,
                        {"role": "sft", "epochs": plan.sft_epochs}, progress, should_stop)


def _train_on_responses(start: Path, out: Path, config, examples: Splits, epochs: float, learning_rate: float,
                        resume: bool, stage: str, provenance: dict, progress: ProgressCallback, should_stop) -> None:
    """Plain cross-entropy on the training responses for `epochs` epochs, the best by dev loss kept."""
    from dataclasses import replace

    from cbd_engine.distill import distill

    steps = max(1, math.ceil(epochs * len(examples.train) / config.batch_size))
    ce_config = replace(config, loss="ce", mode="off_policy", ce_weight=0.0, steps=steps, learning_rate=learning_rate)
    distill(None, start, examples, out, ce_config, work_dir=out.with_name(out.name + ".work"), resume=resume,
            stage=stage, provenance=provenance, progress=progress, should_stop=should_stop)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)


def _register(model_dir: Path, out: Path, config, data: ChainData, provenance: dict) -> None:
    """An anchor used as it is: its files linked (or copied) into the chain folder, its validation loss measured."""
    from cbd_engine.checkpoint import atomic_output_dir, copy_side_files
    from cbd_engine.models import examples_loss, load_model, resolve_device

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
        lineage = json.loads((model_dir / "cbd.json").read_text()) if (model_dir / "cbd.json").is_file() else {}
        lineage["chain"] = {**provenance, "metrics": metrics}
        (tmp / "cbd.json").write_text(json.dumps(lineage, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))


def _pad_id(model_dir: Path) -> int:
    from cbd_engine.batches import pad_id_of
    from cbd_engine.models import load_tokenizer

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


# --- time estimate (torch-free) -------------------------------------------------------------------------------------

# Sustained training FLOP/s by device: the demo chain's 150 steps of 135M teacher + 90M student at 4 x 256 tokens,
# with their dev and validation passes, took 565 s on an idle core pair of this project's CPU (bench/demo.py,
# docs/RESULTS.md "The demo"), ~1.3e11; and a conservative figure for one modern accelerator. For budgeting only:
# a shared or busy machine is slower (docs/DISTILLATION.md).
FLOPS_PER_SECOND = {"cpu": 1.3e11, "gpu": 4e13, "npu": 3e13}
DEFAULT_SOURCE_PARAMS = 1_000_000_000
DATASET_ROWS = 15_000  # a Dolly-sized data set, where the estimate needs its size
DECODING_SLOWDOWN = 10.0  # token-by-token generation against training throughput (measured: docs/DISTILLATION.md)


PADDED_FRACTION = 0.6  # of a training window that holds tokens (prompts and padding leave the rest)


def distillation_flops(config: dict, steps: int, student: int, teacher: int, dataset_rows: int = DATASET_ROWS) -> float:
    """One distillation stage of `steps` steps (DistillConfig settings as a dict): 6 N FLOPs a token for the
    student and 2 N for the teacher, twice that when the student samples (token by token, far below peak), and the
    dev and validation passes (every `eval_every` steps, before and after), each on a tenth of the data set's rows
    (the hash rule's dev or validation split) up to `eval_rows`."""
    tokens = steps * config["batch_size"] * config["max_length"] * PADDED_FRACTION
    flops = tokens * (6 * student + 2 * teacher)
    if config.get("mode") in ("on_policy", "minillm"):
        flops *= 2.0
    evaluations = steps // (config.get("eval_every") or steps) + 2
    rows = min(config.get("eval_rows", 200), dataset_rows // 10)
    return flops + evaluations * 2 * rows * config["max_length"] * PADDED_FRACTION * 2 * student


def _dataset_rows(dataset: dict) -> int:
    """The rows of a local data set file (its lines), else DATASET_ROWS: the estimate must not read a remote set."""
    path = Path(dataset.get("path") or "")
    if not dataset.get("path") or not path.is_file():
        return DATASET_ROWS
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())


def estimate_chain_seconds(spec: dict) -> float:
    """A rough wall-clock estimate of build_chain(spec) (distillation_flops per anchor, plus SFT, a bridge, teacher
    samples and activation importance); torch-free, for the service's budget check."""
    from cbd_engine.calibration import IMPORTANCE_ROWS

    plan = parse_spec(spec)
    config = plan.distillation
    device = {"auto": "gpu"}.get(config.get("device", "auto"), config.get("device", "auto"))
    speed = FLOPS_PER_SECOND.get(device, FLOPS_PER_SECOND["cpu"])
    tokens_per_step = config["batch_size"] * config["max_length"] * PADDED_FRACTION
    sizes = _estimated_sizes(plan)
    seconds, rows = 0.0, _dataset_rows(plan.dataset)
    if plan.sft_epochs:
        sft_steps = plan.sft_epochs * rows / config["batch_size"]
        seconds += sft_steps * tokens_per_step * 6 * sizes[0] / speed
    if plan.bridge is not None:
        seconds += _bridge_flops(plan, sizes[0], tokens_per_step) / speed
    samples = int(plan.dataset.get("teacher_samples") or 0)  # the source answers every training prompt N times
    seconds += samples * rows * config["max_length"] / 2 * 2 * sizes[0] * DECODING_SLOWDOWN / speed
    for teacher, student, anchor in zip(sizes, sizes[1:], plan.anchors, strict=False):
        if anchor.checkpoint is not None and not anchor.distill:
            continue
        flops = distillation_flops(config, config["steps"], student, teacher, rows)
        if anchor.checkpoint is None:
            flops += IMPORTANCE_ROWS * 256 * 2 * teacher  # activation importance on the calibration rows
        seconds += flops / speed
    return float(seconds * 1.2 + 30 * len(plan.anchors))  # evaluation, checkpoints, loading


def _bridge_flops(plan: ChainPlan, bridge_params: int, tokens_per_step: float) -> float:
    """The source's answers (2 N FLOPs a token, token by token far below peak), then the bridge's epochs on them."""
    bridge, config = plan.bridge, plan.distillation
    source = _local_spec(plan.source)
    source_params = source.num_params if source else _source_guess(plan.source)
    per_prompt = bridge.generation.responses_per_prompt
    train, valid = (bridge.num_samples or DATASET_ROWS) * per_prompt, config.get("eval_rows", 200) * per_prompt
    generation = (train + valid) * bridge.generation.max_new_tokens * 2 * source_params * DECODING_SLOWDOWN
    training = bridge.epochs * train / config["batch_size"] * tokens_per_step * 6 * bridge_params
    return generation + training


def _estimated_sizes(plan: ChainPlan) -> list[int]:
    """Parameters of anchor 0 (the source, or the bridge) and of every anchor after it."""
    zero = plan.source if plan.bridge is None else plan.bridge.model
    source_spec = planned_spec(zero) if isinstance(zero, dict) else _local_spec(zero)
    sizes = [source_spec.num_params if source_spec else _source_guess(zero)]
    for anchor in plan.anchors:
        if anchor.size is not None:
            sizes.append(anchor.size)
        elif anchor.shape is not None and source_spec is not None:
            try:
                shape = Shape.from_dict(anchor.shape, chain=source_spec.shape)
                sizes.append(source_spec.architecture.num_params(shape))
            except ShapeError:
                sizes.append(sizes[-1] // 2)
        else:
            checkpoint = _local_spec(anchor.checkpoint) if anchor.checkpoint else None
            sizes.append(checkpoint.num_params if checkpoint else sizes[-1] // 2)
    return sizes


def _local_spec(path: str | None) -> ModelSpec | None:
    try:  # plain JSON: checkpoint.read_config would import torch
        config = json.loads((Path(path) / "config.json").read_text()) if path else None
        return ModelSpec.from_config(config) if config else None
    except (OSError, ValueError):
        return None


def _source_guess(source: str) -> int:
    """The parameters of a source not on this machine yet: a zoo model's, or a guess from a GGUF file's size."""
    from cbd_engine.zoo import zoo_entry

    zoo = zoo_entry(source)
    if zoo is not None:
        return zoo.params
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return int(path.stat().st_size * 1.6)  # ~5 bits a weight in common quantizations
    return DEFAULT_SOURCE_PARAMS


def spec_summary(spec: dict) -> dict:
    """The parsed plan as JSON (for logs and the CLI's dry run)."""
    plan = parse_spec(spec)
    anchors = [asdict(anchor) for anchor in plan.anchors]
    return {**asdict(plan), "anchors": anchors, "estimated_seconds": estimate_chain_seconds(spec)}
