"""The one cost table of the engine (torch-free): sustained FLOP/s by device and the FLOPs of each stage, read by
the chain's estimate here and by the service's estimates for materialization and evaluation (app/services)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from cbd_engine.spec.bridge import planned_spec
from cbd_engine.spec.chain import ChainSpec, parse_spec
from cbd_engine.spec.families import ModelSpec
from cbd_engine.spec.shapes import Shape, ShapeError

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
    from cbd_engine.spec.options import IMPORTANCE_ROWS

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
    for link, (teacher, student, anchor) in enumerate(zip(sizes, sizes[1:], plan.anchors, strict=False)):
        if anchor.checkpoint is not None and not anchor.distill:
            continue
        flops = distillation_flops(config, config["steps"], student, teacher, rows)
        if anchor.checkpoint is None:
            flops += IMPORTANCE_ROWS * 256 * 2 * teacher  # activation importance on the calibration rows
            if plan.interpolation is not None:  # a forward and backward of a model between the two (mean size)
                flops += config["steps"] * tokens_per_step * 6 * (teacher + student) / 2
            if plan.interpolation is not None and plan.interpolation.kind == "nested" and link:
                # nested (distillation/nested.py): the teacher's own forward and backward too (from the 2nd link)
                flops += config["steps"] * tokens_per_step * 6 * teacher
        seconds += flops / speed
    return float(seconds * 1.2 + 30 * len(plan.anchors))  # evaluation, checkpoints, loading


def _bridge_flops(plan: ChainSpec, bridge_params: int, tokens_per_step: float) -> float:
    """The source's answers (2 N FLOPs a token, token by token far below peak), then the bridge's epochs on them."""
    bridge, config = plan.bridge, plan.distillation
    source = _local_spec(plan.source)
    source_params = source.num_params if source else _source_guess(plan.source)
    per_prompt = bridge.generation.responses_per_prompt
    train, valid = (bridge.num_samples or DATASET_ROWS) * per_prompt, config.get("eval_rows", 200) * per_prompt
    generation = (train + valid) * bridge.generation.max_new_tokens * 2 * source_params * DECODING_SLOWDOWN
    training = bridge.epochs * train / config["batch_size"] * tokens_per_step * 6 * bridge_params
    return generation + training


def _estimated_sizes(plan: ChainSpec) -> list[int]:
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
    from cbd_engine.spec.sources import zoo_entry

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
