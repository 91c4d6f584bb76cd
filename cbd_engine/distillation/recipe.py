"""One distillation stage: a student learns from a frozen teacher on an instruction set.

The recipe, top to bottom (`distill`):
  1. load teacher (frozen; or, with `teacher_cache`, its top-k outputs built once, distillation/teacher_cache.py) and
     student; the examples come encoded (batches.encode_rows / encode_text)
  2. the loss on the validation rows before training (reported) and on the dev rows (for selection)
  3. for each step: the global batch (the same for every world size), this rank's share split into micro-batches,
     on-policy responses sampled by the student where asked, the loss normalized by the global number of scored
     tokens, gradients accumulated, clipped, one AdamW step, the learning-rate schedule (mode minillm: the
     gradients of one policy update on the student's rollouts instead, cbd_engine.distillation.minillm)
  4. every `eval_every` steps the dev loss, and the best weights by it kept (the contract's dev rows choose, the
     validation rows only report); every `checkpoint_every` steps a resumable checkpoint (weights as safetensors,
     optimizer/schedule/step as a weights_only torch file)
  5. the best weights scored on the validation rows and written as a Hugging Face folder with metrics, loss curves
     (CSV and PNG) and provenance

Determinism: the data order is a function of (seed, epoch), and every step reseeds the random generators from
(seed, step); so a run resumed from a checkpoint ends with the same weights as an uninterrupted run (on CPU).
"""


from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from cbd_engine.data.batches import Example, bucketed_batches, collate, pad_id_of
from cbd_engine.data.rows import Splits
from cbd_engine.distillation.checkpoints import (
    FULL_STATE,
    existing,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    shard_fsdp,
)
from cbd_engine.distillation.curves import write_curves
from cbd_engine.distillation.minillm import PolicyDistillation
from cbd_engine.distillation.on_policy import sample_responses
from cbd_engine.distillation.selection import evaluate_and_keep_best, rouge_l_of, rouge_prompts_and_references
from cbd_engine.distillation.step import StudentLoss, TrainedPath, accumulate_gradients, lr_lambda
from cbd_engine.distillation.teacher_cache import CacheSettings, TeacherCache, build_teacher_cache, teacher_cache_folder
from cbd_engine.io.atomic import atomic_output_dir
from cbd_engine.io.checkpoint import copy_side_files
from cbd_engine.io.lineage import write_lineage
from cbd_engine.nn.device import autocast_for, resolve_device
from cbd_engine.nn.distributed import init_distributed, unsharded_root, world
from cbd_engine.nn.loading import compile_decoders, load_model, load_tokenizer, output_head
from cbd_engine.nn.validation import examples_loss
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import Cancelled, ProgressCallback, StageTimer, no_progress


@dataclass
class DistillResult:
    path: Path
    metrics: dict = field(default_factory=dict)


def distill(teacher_dir: str | Path | None, student_dir: str | Path, data: Splits, out: str | Path,
            config: DistillConfig, *, work_dir: str | Path | None = None, resume: bool = False,
            stage: str = "distill", provenance: dict | None = None, progress: ProgressCallback = no_progress,
            should_stop: Callable[[], bool] | None = None, path: TrainedPath | None = None) -> DistillResult:
    """Distill `student_dir` from `teacher_dir` (None, or loss "ce": plain fine-tuning) on `data` (encoded examples
    by split) and write the best student (by dev loss; the last one when there are no dev rows) to `out` as a Hugging
    Face folder. `work_dir` holds checkpoints; with `resume` a run continues from its last one. Raises Cancelled
    when `should_stop()` says so (checked every step). `path`: the path between teacher and student trained in the
    same steps (line: interpolation.py; nested widths: nested.py), off-policy only."""
    out, student_dir = Path(out), Path(student_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    run = Run.setup(teacher_dir, student_dir, data, config, stage, progress, path)  # 1. models, optimizer, data
    state = run.start(work, resume)  # 2. validation before training, or the last checkpoint
    timer = StageTimer(stage, config.steps, progress)
    timer.update(state["step"], state["history"][-1].get("loss") if state["history"] else None)
    started = time.monotonic()
    while state["step"] < config.steps:  # 3. the steps
        if should_stop is not None and should_stop():
            raise Cancelled(f"{stage} cancelled at step {state['step']}")
        row = run.step(state)
        last = state["step"] == config.steps
        if config.eval_every and state["step"] % config.eval_every == 0 and not last:  # 4. validate, checkpoint
            row.update(evaluate_and_keep_best(run.student, run.validate, config.select_by, state, work / "best"))
        state["history"].append(row)
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 and not last:
            save_checkpoint(work / "checkpoint", run.student, run.optimizer, run.scheduler, state)
        timer.update(state["step"], row["loss"], row["tokens_per_second"])
    metrics, full_weights = run.finish(state, work / "best", time.monotonic() - started)  # 5. the kept weights
    if run.rank == 0:
        _write_output(out, run.student, student_dir, teacher_dir, config, metrics, state["history"], provenance, stage,
                      full_weights)
    if run.world_size > 1:
        dist.barrier()
    return DistillResult(out, metrics)


@dataclass
class Run:
    """What one distillation run holds: its settings, splits, models and optimizer (Run.setup makes them)."""

    config: DistillConfig
    device: torch.device
    bf16: bool
    ce_only: bool  # plain fine-tuning: loss "ce", or no teacher
    train: list[Example]
    dev: list[Example]
    valid: list[Example]
    tokenizer: object
    student: nn.Module
    teacher: nn.Module | TeacherCache | None
    student_loss: nn.Module  # StudentLoss, wrapped by DDP or FSDP under torchrun
    fsdp: bool
    policy: PolicyDistillation | None  # mode minillm
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rouge_set: tuple[list[str], list[str]]
    path: TrainedPath | None = None
    plans: dict[int, list[list[int]]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return world()[0]

    @property
    def world_size(self) -> int:
        return world()[1]

    @classmethod
    def setup(cls, teacher_dir: str | Path | None, student_dir: Path, data: Splits, config: DistillConfig, stage: str,
              progress: ProgressCallback, path: TrainedPath | None = None) -> Run:
        device = resolve_device(config.device)
        init_distributed(device)
        world_size = world()[1]
        train, dev, valid = data.train, data.dev[: config.eval_rows], data.validation[: config.eval_rows]
        if config.batch_size % world_size:
            raise ValueError(f"batch_size {config.batch_size} is not a multiple of the {world_size} processes")
        if len(train) < config.batch_size:
            raise ValueError(f"{len(train)} training examples are fewer than one batch of {config.batch_size}")
        if not valid:
            raise ValueError("no validation examples: the validation split is empty")
        accelerated = device.type != "cpu"
        bf16 = accelerated if config.bf16 is None else config.bf16
        ce_only = config.loss == "ce" or teacher_dir is None
        if config.mode == "minillm" and ce_only:
            raise ValueError("mode minillm needs a teacher")
        if path is not None and (ce_only or config.mode != "off_policy" or config.fsdp):
            raise ValueError("a trained path (distillation.interpolation) needs a teacher, mode off_policy and no "
                             "FSDP (its models gather whole parameters)")

        tokenizer = load_tokenizer(student_dir)
        _seed_everything(config.seed, 0)
        student = load_model(student_dir, device).train()
        teacher = None if ce_only else _teacher(teacher_dir, student, train, config, device, bf16, stage, progress)
        if config.gradient_checkpointing if config.gradient_checkpointing is not None else accelerated:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.compile:
            compile_decoders(student, teacher)
        student_loss: nn.Module = StudentLoss(student, config.loss_config)
        fsdp = config.fsdp and world_size > 1
        if fsdp:
            student_loss = shard_fsdp(student_loss)
        elif world_size > 1:
            student_loss = DistributedDataParallel(student_loss, device_ids=[device.index] if accelerated else None)
        policy = PolicyDistillation(student, student_loss, teacher, tokenizer, config, device, bf16, synced=fsdp) \
            if config.mode == "minillm" else None
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        rouge_set = rouge_prompts_and_references(tokenizer, dev[: config.rouge_rows])
        return cls(config, device, bf16, ce_only, train, dev, valid, tokenizer, student, teacher, student_loss, fsdp,
                   policy, optimizer, scheduler, rouge_set, path)

    def start(self, work: Path, resume: bool) -> dict:
        """The run's state: from its last checkpoint when resuming, else fresh, with the numbers before training."""
        found = existing(work / "checkpoint") if resume else None
        if found is not None:
            return load_checkpoint(found, self.student, self.optimizer, self.scheduler)
        if work.exists() and self.rank == 0:
            shutil.rmtree(work)
        before = {**self.validate(), "validation_loss": self.loss_on(self.valid)}
        save_weights(self.student, work / "best", {"step": 0, **before})
        return {"step": 0, "tokens": 0, "before": before, "best": before, "best_step": 0,
                "history": [{"step": 0, "tokens": 0, **before}]}

    def step(self, state: dict) -> dict:
        """One optimizer step; returns its row of the loss curve and advances state's step and tokens."""
        config, step, tick = self.config, state["step"], time.monotonic()
        rng = _seed_everything(config.seed + 7919 * self.rank, step + 1)  # ranks sample different responses
        if self.policy is not None:  # minillm: update step % ppo_epochs on the rollouts of batch step // ppo_epochs
            stats = self.policy.update(step, self.examples(step // config.ppo_epochs), rng)
            step_tokens = stats["sequence_tokens"]
        else:
            stats, step_tokens = self.gradients(self.examples(step), rng, step)
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        seconds = time.monotonic() - tick
        state["step"] = step + 1
        state["tokens"] = state.get("tokens", 0) + step_tokens
        return {"step": step + 1, "tokens": state["tokens"], **stats, "learning_rate": learning_rate,
                "grad_norm": grad_norm, "tokens_per_second": step_tokens / max(seconds, 1e-9), "seconds": seconds}

    def gradients(self, examples: list[Example], rng: random.Random, step: int) -> tuple[dict, int]:
        """Off- or on-policy: the step's loss statistics and tokens, its gradients accumulated."""
        config = self.config
        if config.mode == "on_policy":
            with unsharded_root(self.student_loss):
                examples = sample_responses(self.student, examples, self.tokenizer, config, rng, synced=self.fsdp)
        micro = config.micro_batch_size or config.batch_size // self.world_size
        pad_id = pad_id_of(self.tokenizer)
        batches = [collate(examples[i : i + micro], pad_id) for i in range(0, len(examples), micro)]
        # the path's draw: one per step for every rank (from (seed, step) alone, not the rank's generator)
        path = self.path.step(random.Random(config.seed * 1_000_003 + step)) if self.path is not None else None
        div_total, ce_total, global_tokens, global_reference, path_totals = accumulate_gradients(
            self.student_loss, self.teacher, batches, config, self.device, self.bf16, self.ce_only, path)
        divergence = div_total / max(global_tokens, 1)
        cross_entropy = ce_total / max(global_reference, 1)
        stats = {"loss": cross_entropy if self.ce_only else divergence + config.ce_weight * cross_entropy,
                 "divergence": None if self.ce_only else divergence,
                 "cross_entropy": cross_entropy if (self.ce_only or config.ce_weight) else None}
        for part, total in path_totals.items():
            stats[f"{part}_divergence"] = total / max(global_tokens, 1)
            stats["loss"] += path.weights[part] * stats[f"{part}_divergence"]
        if path is not None:
            stats.update(path.stats())
        return stats, sum(b.num_tokens for b in batches) * self.world_size

    def examples(self, step: int) -> list[Example]:
        return step_examples(self.train, self.batch_plan, step, self.rank, self.world_size)

    def batch_plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self.plans:
            lengths = [len(example) for example in self.train]
            self.plans[epoch] = bucketed_batches(lengths, self.config.batch_size, self.config.seed, epoch)
        return self.plans[epoch]

    def loss_on(self, examples: list[Example]) -> float:
        """The validation loss (nn.validation), computed inside the loss module's forward: a sharded student only
        gathers its weights there."""
        def through(compute: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
            return self.student_loss(lambda student, _config: compute(student))

        return examples_loss(self.student_loss, examples, pad_id_of(self.tokenizer), self.config.eval_batch_size,
                             self.bf16, through=through)

    def dev_loss_of(self, model: nn.Module) -> float:
        """The dev loss of another model than the student (a trained path's, e.g. a nested width)."""
        return examples_loss(model, self.dev, pad_id_of(self.tokenizer), self.config.eval_batch_size, self.bf16)

    def validate(self) -> dict:
        """The selection's numbers, on the dev rows (none: nothing to select by, the last step is kept); with a
        trained path, its own (nested widths: the mean of the whole's and the smallest width's)."""
        if not self.dev:
            return {}
        own = self.loss_on(self.dev)
        result = self.path.selection(self.student, own, self.dev_loss_of) if self.path else {"dev_loss": own}
        if self.config.select_by == "rouge_l":
            with autocast_for(self.device, self.bf16), unsharded_root(self.student_loss):
                result["rouge_l"] = rouge_l_of(self.student, self.tokenizer, *self.rouge_set, self.config)
        return result

    def finish(self, state: dict, best_dir: Path, seconds: float) -> tuple[dict, dict | None]:
        """The last validation, the best weights loaded back and scored on the validation rows; the metrics and,
        under FSDP, the full weights (gathered by every rank, written by rank 0)."""
        config = self.config
        final = evaluate_and_keep_best(self.student, self.validate, config.select_by, state, best_dir)
        state["history"][-1].update(final)
        if state["best_step"] != state["step"]:
            load_weights(self.student, best_dir)
        validation = self.loss_on(self.valid)  # of the kept weights: reported, never chosen by
        state["history"][state["best_step"]].setdefault("validation_loss", validation)  # row k is step k
        full_weights = get_model_state_dict(self.student, options=FULL_STATE) if self.fsdp else None
        before, best = state["before"], state["best"]
        metrics = {
            "validation_loss_before": before["validation_loss"], "validation_loss": validation,
            "dev_loss_before": before.get("dev_loss"), "dev_loss": best.get("dev_loss"),
            "dev_loss_final_step": final.get("dev_loss"), "best_step": state["best_step"],
            **{key: value for key, value in best.items() if key.startswith("dev_loss_")},  # nested: by width
            "selected_by": config.select_by if self.dev else "last step (no dev rows)",
            "rows": {"train": len(self.train), "dev": len(self.dev), "validation": len(self.valid)},
            **({"rouge_l_before": before["rouge_l"], "rouge_l": best["rouge_l"]}
               if config.select_by == "rouge_l" and self.dev else {}),
            "steps": config.steps, "train_loss_last": state["history"][-1].get("loss"),
            "seconds_this_run": seconds, "world_size": self.world_size,
            **(self.policy.summary(state["history"]) if self.policy is not None else {}),
        }
        return metrics, full_weights


def _teacher(teacher_dir: str | Path, student: nn.Module, train: list[Example], config: DistillConfig,
             device: torch.device, bf16: bool, stage: str, progress: ProgressCallback) -> nn.Module | TeacherCache:
    """The frozen teacher, or its cached top-k outputs (config.teacher_cache): then the teacher is never loaded."""
    if not config.teacher_cache:
        return load_model(teacher_dir, device).eval().requires_grad_(False)
    teacher = open_teacher_cache(teacher_dir, train, config, device, bf16, f"{stage}: teacher cache", progress)
    if teacher.vocab != output_head(student).weight.shape[0]:
        raise ValueError(f"the teacher's output layer has {teacher.vocab} rows, the student's "
                         f"{output_head(student).weight.shape[0]}: the teacher cache needs the same vocabulary")
    return teacher


def _seed_everything(seed: int, step: int) -> random.Random:
    """Generators for one step, derived from (seed, step) only: resuming at any step reproduces them."""
    mixed = (seed * 1_000_003 + step) % 2**63
    torch.manual_seed(mixed)
    return random.Random(mixed)


def step_examples(train: list[Example], batch_plan: Callable[[int], list[list[int]]], step: int, rank: int,
                  world_size: int) -> list[Example]:
    """This rank's contiguous share of the global batch of `step`, each example carrying its index in `train`."""
    plan = batch_plan(step // len(batch_plan(0)))
    indices = plan[step % len(plan)]
    share = len(indices) // world_size
    return [replace(train[i], index=i) for i in indices[rank * share : (rank + 1) * share]]


def open_teacher_cache(teacher_dir: str | Path, train: list[Example], config: DistillConfig, device: torch.device,
                       bf16: bool, stage: str, progress: ProgressCallback) -> TeacherCache:
    """The teacher's cached top-k over `train`: built by rank 0 unless it exists (the other ranks wait), then read
    by every rank."""
    settings = CacheSettings(config.teacher_cache, config.temperature, bf16)
    if world()[0] == 0:
        build_teacher_cache(teacher_dir, train, settings, config.teacher_cache_dir, device=device,
                            batch_size=config.eval_batch_size, stage=stage, progress=progress)
    if world()[1] > 1:
        dist.barrier()
    return TeacherCache(teacher_cache_folder(teacher_dir, train, settings, config.teacher_cache_dir))


def _write_output(out: Path, student: nn.Module, student_dir: Path, teacher_dir: str | Path | None,
                  config: DistillConfig, metrics: dict, history: list[dict], provenance: dict | None,
                  stage: str, state_dict: dict | None = None) -> None:
    with atomic_output_dir(out) as tmp:
        student.save_pretrained(tmp, state_dict=state_dict)
        copy_side_files(student_dir, tmp)
        write_lineage(student_dir, tmp, "distillation", {
            "stage": stage,
            "teacher": str(teacher_dir) if teacher_dir else None,
            "student_init": str(student_dir),
            "config": asdict(config),
            "metrics": metrics,
            **(provenance or {}),
        })
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_curves(history, tmp, title=stage)
