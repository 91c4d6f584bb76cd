"""One distillation stage: a student learns from a frozen teacher on an instruction set.

The recipe, top to bottom (`distill`):
  1. load teacher (frozen; or, with `teacher_cache`, its top-k outputs built once, cbd_engine.teacher_cache) and
     student; the examples come encoded (batches.encode_rows / encode_text)
  2. the loss on the validation rows before training (reported) and on the dev rows (for selection)
  3. for each step: the global batch (the same for every world size), this rank's share split into micro-batches,
     on-policy responses sampled by the student where asked, the loss normalized by the global number of scored
     tokens, gradients accumulated, clipped, one AdamW step, the learning-rate schedule (mode minillm: the
     gradients of one policy update on the student's rollouts instead, cbd_engine.minillm)
  4. every `eval_every` steps the dev loss, and the best weights by it kept (the contract's dev rows choose, the
     validation rows only report); every `checkpoint_every` steps a resumable checkpoint (weights as safetensors,
     optimizer/schedule/step as a weights_only torch file)
  5. the best weights scored on the validation rows and written as a Hugging Face folder with metrics, loss curves
     (CSV and PNG) and provenance

Determinism: the data order is a function of (seed, epoch), and every step reseeds the random generators from
(seed, step); so a run resumed from a checkpoint ends with the same weights as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cbd_engine.batches import (
    IGNORE,
    Batch,
    Example,
    bucketed_batches,
    collate,
    next_token_targets,
    pad_id_of,
)
from cbd_engine.checkpoint import atomic_output_dir, copy_side_files
from cbd_engine.data import Splits
from cbd_engine.distill_config import DistillConfig
from cbd_engine.distributed import all_reduce_sum, init_distributed, unsharded_root, world
from cbd_engine.losses import LossConfig, chunked_token_losses
from cbd_engine.minillm import PolicyDistillation
from cbd_engine.models import (
    autocast_for,
    compile_decoders,
    hidden_states,
    load_model,
    output_head,
    resolve_device,
)
from cbd_engine.progress import Cancelled, ProgressCallback, StageTimer, no_progress
from cbd_engine.teacher_cache import CacheSettings, TeacherCache, build_teacher_cache, teacher_cache_folder


@dataclass
class DistillResult:
    path: Path
    metrics: dict = field(default_factory=dict)


# --- the student's loss as one module, so DDP/FSDP see every student computation inside forward --------------------


class StudentLoss(nn.Module):
    """The student as the one module that DDP or FSDP wraps: forward(compute) returns compute(student, loss config),
    so every computation of the student that carries gradients runs inside the wrapper's forward (DDP readies its
    gradient reduction there, FSDP gathers the weights). The teacher is an argument of `compute`, not a submodule:
    it is frozen and never wrapped."""

    def __init__(self, student: nn.Module, config: LossConfig):
        super().__init__()
        self.student, self.config = student, config

    def forward(self, compute: Callable[[nn.Module, LossConfig], Any]) -> Any:
        return compute(self.student, self.config)


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, batch: Batch, scored: torch.Tensor) -> torch.Tensor:
    return hidden_states(teacher, batch.input_ids, batch.attention_mask)[scored]


def batch_loss_sums(student_loss: nn.Module, teacher: nn.Module | TeacherCache | None, batch: Batch, ce_only: bool,
                    need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence sum over all scored tokens, cross-entropy sum over reference-response tokens) of one batch."""
    targets = next_token_targets(batch.labels)
    scored = targets != IGNORE
    ce_targets = torch.where(batch.reference[:, None], targets, torch.full_like(targets, IGNORE))
    teacher_hidden, teacher_head = None, None
    if not ce_only and isinstance(teacher, TeacherCache):
        teacher_hidden = teacher.for_batch(batch)  # the teacher's top-k, cached: no teacher forward
    elif not ce_only and teacher is not None:
        teacher_hidden, teacher_head = teacher_hidden_states(teacher, batch, scored), output_head(teacher)

    def sums(student: nn.Module, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[scored]
        return chunked_token_losses(hidden, output_head(student), ce_targets[scored], teacher_hidden, teacher_head,
                                    config, need_ce or ce_only)

    return student_loss(sums)


def accumulate_gradients(student_loss: nn.Module, teacher: nn.Module | TeacherCache | None, batches: list[Batch],
                         config: DistillConfig, device: torch.device, bf16: bool, ce_only: bool,
                         ) -> tuple[float, float, float, float]:
    """Backward over this rank's micro-batches of one step. Each micro-batch contributes its loss *sums* divided by
    the token counts of the whole global batch (all micro-batches, all ranks), so the accumulated gradient is the
    same for any split into ranks and micro-batches. Returns global (divergence sum, cross-entropy sum, scored
    tokens, reference tokens)."""
    world_size = world()[1]
    local = [sum(b.num_response_tokens for b in batches), sum(b.num_reference_tokens for b in batches)]
    global_tokens, global_reference = all_reduce_sum(local, device)
    div_total, ce_total = 0.0, 0.0
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        defer_sync = world_size > 1 and index < len(batches) - 1 and hasattr(student_loss, "no_sync")
        with student_loss.no_sync() if defer_sync else contextlib.nullcontext(), autocast_for(device, bf16):
            div_sum, ce_sum = batch_loss_sums(student_loss, teacher, batch, ce_only, need_ce=config.ce_weight > 0)
            if ce_only:
                loss = ce_sum / max(global_reference, 1)
            else:
                loss = div_sum / max(global_tokens, 1) + config.ce_weight * ce_sum / max(global_reference, 1)
            (loss * world_size).backward()  # DDP averages gradients over ranks; the sums want them added
        div_total += float(div_sum.detach())
        ce_total += float(ce_sum.detach())
    div_total, ce_total = all_reduce_sum([div_total, ce_total], device)
    return div_total, ce_total, global_tokens, global_reference


# --- on-policy sampling ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_responses(student: nn.Module, examples: list[Example], tokenizer, config: DistillConfig,
                     rng: random.Random, synced: bool = False) -> list[Example]:
    """Replace the response of each example by one the student samples, except a `data_mix` fraction that keeps
    the data set's response. Sampled responses are scored by the divergence only, never by cross-entropy.
    `synced` (FSDP): every rank runs the same number of forwards, as each one gathers weights with the others
    (transformers' `synced_gpus`); a rank with nothing to sample samples one response and drops it."""
    chosen = [i for i in range(len(examples)) if rng.random() >= config.data_mix]
    sampled = chosen or ([0] if synced else [])
    if not sampled:
        return examples
    device = next(student.parameters()).device
    pad_id, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    prompts = [examples[i].input_ids[: examples[i].prompt_length] for i in sampled]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding: generation continues right after each prompt
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    was_training = student.training
    student.eval()
    room = max(config.max_length - width, 1)
    generated = student.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
        temperature=config.sample_temperature, top_k=0, top_p=1.0, max_new_tokens=min(config.max_new_tokens, room),
        pad_token_id=pad_id, eos_token_id=eos, synced_gpus=synced,
    )[:, width:].tolist()
    student.train(was_training)
    result = list(examples)
    for i, response in zip(chosen, generated[: len(chosen)], strict=True):  # a lone synced sample is dropped
        if eos is not None and eos in response:
            response = response[: response.index(eos) + 1]
        prompt = examples[i].input_ids[: examples[i].prompt_length]
        response = response[: max(config.max_length - len(prompt), 1)]
        result[i] = Example(prompt + response, [IGNORE] * len(prompt) + response, len(prompt), reference=False)
    return result


# --- schedule, checkpoints, curves ----------------------------------------------------------------------------------


def lr_lambda(config: DistillConfig) -> Callable[[int], float]:
    warmup = config.warmup_steps if config.warmup_steps is not None else max(config.steps // 20, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(config.steps - warmup, 1), 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace folder `target` by `tmp`; a kill at any moment leaves `target` or `target.old` whole."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _existing(target: Path) -> Path | None:
    for candidate in (target, target.with_name(target.name + ".old")):
        if (candidate / "model.safetensors").is_file() and (candidate / "state.json").is_file():
            return candidate
    return None


# Full (unsharded) state dicts on the CPU. Under FSDP, taking one is a collective (every rank calls it) and setting one
# gives each rank its shard; in one process or under DDP they are the model's own tensors.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_weights(model: nn.Module, folder: Path, state: dict) -> None:
    """Weights (safetensors) plus a small JSON state, swapped in atomically by rank 0. Every rank calls it (under FSDP
    the weights are gathered first) and it returns when the folder is complete."""
    _save(folder, get_model_state_dict(model, options=FULL_STATE), model, state)


def load_weights(model: nn.Module, folder: Path) -> dict:
    weights = load_file(folder / "model.safetensors")
    set_model_state_dict(model, _with_aliases(weights, model), options=StateDictOptions(full_state_dict=True))
    return json.loads((folder / "state.json").read_text())


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, state: dict) -> None:
    """A resumable checkpoint, saved as save_weights does. Tensors go to safetensors; the optimizer's full state dict
    (tensors and numbers, keyed by parameter name) and the schedule's to a torch file read back with
    weights_only=True."""
    weights = get_model_state_dict(model, options=FULL_STATE)
    resume_state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
                    "scheduler": scheduler.state_dict()}
    _save(folder, weights, model, state, lambda tmp: torch.save(resume_state, tmp / "optimizer.pt"))


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler) -> dict:
    state = load_weights(model, folder)
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    return state


def _save(folder: Path, weights: dict, model: nn.Module, state: dict,
          write_more: Callable[[Path], None] | None = None) -> None:
    if world()[0] == 0:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_without_aliases(weights, model), str(tmp / "model.safetensors"))
        if write_more is not None:
            write_more(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _swap_in(tmp, folder)
    if dist.is_initialized():
        dist.barrier()


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameters: {second name: first name} (a tied output layer's weight is the embedding's)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def _without_aliases(weights: dict, model: nn.Module) -> dict:
    aliases = _aliases(model)  # safetensors stores a tensor once: drop the names that only repeat one
    return {name: tensor for name, tensor in weights.items() if name not in aliases}


def _with_aliases(weights: dict, model: nn.Module) -> dict:
    return {**weights, **{name: weights[first] for name, first in _aliases(model).items() if first in weights}}


CURVE_FIELDS = ("step", "tokens", "loss", "divergence", "cross_entropy", "learning_rate", "grad_norm",
                "tokens_per_second", "dev_loss", "rouge_l", "validation_loss")


def write_curves(history: list[dict], folder: Path, title: str = "distillation") -> None:
    """loss_curve.csv (one row per step, dev loss where measured; validation loss before training and of the kept
    weights) and loss_curve.png."""
    with open(folder / "loss_curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    train = [(row["step"], row["loss"]) for row in history if row.get("loss") is not None]
    dev = [(row["step"], row["dev_loss"]) for row in history if row.get("dev_loss") is not None]
    valid = [(row["step"], row["validation_loss"]) for row in history if row.get("validation_loss") is not None]
    if train:
        axis.plot(*zip(*train, strict=True), label="training loss")
    if dev:
        axis.plot(*zip(*dev, strict=True), "o-", label="dev loss (response CE; selects the kept weights)")
    if valid:
        axis.plot(*zip(*valid, strict=True), "s", label="validation loss (before; kept weights)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "loss_curve.png", dpi=100)
    plt.close(figure)


# --- the recipe -----------------------------------------------------------------------------------------------------


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


def distill(teacher_dir: str | Path | None, student_dir: str | Path, data: Splits, out: str | Path,
            config: DistillConfig, *, work_dir: str | Path | None = None, resume: bool = False,
            stage: str = "distill", provenance: dict | None = None, progress: ProgressCallback = no_progress,
            should_stop: Callable[[], bool] | None = None) -> DistillResult:
    """Distill `student_dir` from `teacher_dir` (None, or loss "ce": plain fine-tuning) on `data` (encoded examples
    by split) and write the best student (by dev loss; the last one when there are no dev rows) to `out` as a Hugging
    Face folder. `work_dir` holds checkpoints; with `resume` a run continues from its last one. Raises Cancelled
    when `should_stop()` says so (checked every step)."""
    from cbd_engine.models import load_tokenizer

    out, student_dir = Path(out), Path(student_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    device = resolve_device(config.device)
    init_distributed(device)
    rank, world_size = world()
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

    tokenizer = load_tokenizer(student_dir)
    pad_id = pad_id_of(tokenizer)
    _seed_everything(config.seed, 0)
    student = load_model(student_dir, device).train()
    if ce_only:
        teacher = None
    elif config.teacher_cache:
        teacher = open_teacher_cache(teacher_dir, train, config, device, bf16, f"{stage}: teacher cache", progress)
        if teacher.vocab != output_head(student).weight.shape[0]:
            raise ValueError(f"the teacher's output layer has {teacher.vocab} rows, the student's "
                             f"{output_head(student).weight.shape[0]}: the teacher cache needs the same vocabulary")
    else:
        teacher = load_model(teacher_dir, device).eval().requires_grad_(False)
    if config.gradient_checkpointing if config.gradient_checkpointing is not None else accelerated:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        compile_decoders(student, teacher)

    student_loss: nn.Module = StudentLoss(student, config.loss_config)
    fsdp = config.fsdp and world_size > 1
    if fsdp:
        student_loss = _shard_fsdp(student_loss)
    elif world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        student_loss = DistributedDataParallel(student_loss, device_ids=[device.index] if accelerated else None)
    policy = PolicyDistillation(student, student_loss, teacher, tokenizer, config, device, bf16, synced=fsdp) \
        if config.mode == "minillm" else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

    rouge_set = rouge_prompts_and_references(tokenizer, dev[: config.rouge_rows])

    def loss_on(examples: list[Example]) -> float:
        return validation_loss_of(student_loss, examples, pad_id, config.eval_batch_size, device, bf16)

    def validate() -> dict:
        """The selection's numbers, on the dev rows (none: nothing to select by, the last step is kept)."""
        if not dev:
            return {}
        result = {"dev_loss": loss_on(dev)}
        if config.select_by == "rouge_l":
            with autocast_for(device, bf16), unsharded_root(student_loss):
                result["rouge_l"] = rouge_l_of(student, tokenizer, *rouge_set, config)
        return result

    lengths = [len(example) for example in train]
    plans: dict[int, list[list[int]]] = {}

    def batch_plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans[epoch] = bucketed_batches(lengths, config.batch_size, config.seed, epoch)
        return plans[epoch]

    state = {"step": 0, "tokens": 0, "best": None, "best_step": None, "history": []}
    checkpoint_dir, best_dir = work / "checkpoint", work / "best"
    found = _existing(checkpoint_dir) if resume else None
    if found is not None:
        state = load_checkpoint(found, student, optimizer, scheduler)
    else:
        if work.exists() and rank == 0:
            shutil.rmtree(work)
        before = {**validate(), "validation_loss": loss_on(valid)}
        state.update(before=before, best=before, best_step=0)
        state["history"].append({"step": 0, "tokens": 0, **before})
        save_weights(student, best_dir, {"step": 0, **before})

    timer = StageTimer(stage, config.steps, progress)
    timer.update(state["step"], state["history"][-1].get("loss") if state["history"] else None)
    micro = config.micro_batch_size or config.batch_size // world_size
    started = time.monotonic()
    while state["step"] < config.steps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"{stage} cancelled at step {state['step']}")
        step = state["step"]
        tick = time.monotonic()
        rng = _seed_everything(config.seed + 7919 * rank, step + 1)  # ranks sample different responses
        if policy is not None:  # minillm: update step % ppo_epochs on the rollouts of prompt batch step // ppo_epochs
            stats = policy.update(step, step_examples(train, batch_plan, step // config.ppo_epochs, rank, world_size),
                                  rng)
            step_tokens = stats["sequence_tokens"]
        else:
            examples = step_examples(train, batch_plan, step, rank, world_size)
            if config.mode == "on_policy":
                with unsharded_root(student_loss):
                    examples = sample_responses(student, examples, tokenizer, config, rng, synced=fsdp)
            batches = [collate(examples[i : i + micro], pad_id) for i in range(0, len(examples), micro)]
            div_total, ce_total, global_tokens, global_reference = accumulate_gradients(
                student_loss, teacher, batches, config, device, bf16, ce_only)
            divergence = div_total / max(global_tokens, 1)
            cross_entropy = ce_total / max(global_reference, 1)
            stats = {"loss": cross_entropy if ce_only else divergence + config.ce_weight * cross_entropy,
                     "divergence": None if ce_only else divergence,
                     "cross_entropy": cross_entropy if (ce_only or config.ce_weight) else None}
            step_tokens = sum(b.num_tokens for b in batches) * world_size
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()

        seconds = time.monotonic() - tick
        state["step"] = step + 1
        state["tokens"] = state.get("tokens", 0) + step_tokens
        row = {"step": step + 1, "tokens": state["tokens"], **stats, "learning_rate": learning_rate,
               "grad_norm": grad_norm, "tokens_per_second": step_tokens / max(seconds, 1e-9), "seconds": seconds}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            row.update(_evaluate_and_keep_best(student, validate, config.select_by, state, best_dir))
        state["history"].append(row)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(checkpoint_dir, student, optimizer, scheduler, state)
        timer.update(step + 1, row["loss"], row["tokens_per_second"])

    final = _evaluate_and_keep_best(student, validate, config.select_by, state, best_dir)
    state["history"][-1].update(final)
    if state["best_step"] != state["step"]:
        load_weights(student, best_dir)
    validation = loss_on(valid)  # of the kept weights: reported, never chosen by
    state["history"][state["best_step"]].setdefault("validation_loss", validation)  # row k is step k
    # a sharded student is gathered to full tensors (a collective: every rank), then rank 0 writes them
    full_weights = get_model_state_dict(student, options=FULL_STATE) if fsdp else None
    metrics = {
        "validation_loss_before": state["before"]["validation_loss"],
        "validation_loss": validation,
        "dev_loss_before": state["before"].get("dev_loss"),
        "dev_loss": state["best"].get("dev_loss"),
        "dev_loss_final_step": final.get("dev_loss"),
        "best_step": state["best_step"],
        "selected_by": config.select_by if dev else "last step (no dev rows)",
        "rows": {"train": len(train), "dev": len(dev), "validation": len(valid)},
        **({"rouge_l_before": state["before"]["rouge_l"], "rouge_l": state["best"]["rouge_l"]}
           if config.select_by == "rouge_l" and dev else {}),
        "steps": config.steps,
        "train_loss_last": state["history"][-1].get("loss"),
        "seconds_this_run": time.monotonic() - started,
        "world_size": world_size,
        **(policy.summary(state["history"]) if policy is not None else {}),
    }
    if rank == 0:
        _write_output(out, student, student_dir, teacher_dir, config, metrics, state["history"], provenance, stage,
                      full_weights)
    if world_size > 1:
        dist.barrier()
    return DistillResult(out, metrics)


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


def _improves(result: dict, best: dict, select_by: str) -> bool:
    """Lower dev loss (or higher Rouge-L on the dev rows) than the best so far; with no dev rows, every later step."""
    if "dev_loss" not in result:
        return True
    if select_by == "rouge_l":
        return result["rouge_l"] > best["rouge_l"]
    return result["dev_loss"] < best["dev_loss"]


def _evaluate_and_keep_best(student: nn.Module, validate: Callable[[], dict], select_by: str, state: dict,
                            best_dir: Path) -> dict:
    result = validate()
    if _improves(result, state["best"], select_by):
        state["best"], state["best_step"] = result, state["step"]
        save_weights(student, best_dir, {"step": state["step"], **result})
    return result


def rouge_prompts_and_references(tokenizer, examples: list[Example]) -> tuple[list[str], list[str]]:
    prompts = [tokenizer.decode(e.input_ids[: e.prompt_length]) for e in examples]
    references = [tokenizer.decode([t for t in e.labels if t != IGNORE], skip_special_tokens=True).strip()
                  for e in examples]
    return prompts, references


def rouge_l_of(student: nn.Module, tokenizer, prompts: list[str], references: list[str],
               config: DistillConfig) -> float:
    """Mean Rouge-L F of greedy responses to validation prompts (the evaluation module's generation and scorer)."""
    from cbd_engine.evaluation.scoring import greedy_generate, rouge_l

    was_training = student.training
    student.eval()
    with torch.no_grad():
        outputs = greedy_generate(student, tokenizer, prompts, max_new_tokens=config.rouge_max_new_tokens,
                                  batch_size=config.eval_batch_size, max_length=config.max_length)
    student.train(was_training)
    scores = rouge_l(outputs, references)
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def validation_loss_of(student_loss: nn.Module, examples: list[Example], pad_id: int, batch_size: int,
                       device: torch.device, bf16: bool) -> float:
    """models.examples_loss, but through the (possibly DDP/FSDP-wrapped) loss module: a sharded student only
    gathers its weights inside the wrapper's forward."""
    was_training = student_loss.training
    student_loss.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id).to(device)
        with autocast_for(device, bf16):
            _, ce = batch_loss_sums(student_loss, None, batch, ce_only=True)
        total += float(ce)
        count += batch.num_response_tokens
    student_loss.train(was_training)
    return total / max(count, 1)


def _write_output(out: Path, student: nn.Module, student_dir: Path, teacher_dir: str | Path | None,
                  config: DistillConfig, metrics: dict, history: list[dict], provenance: dict | None,
                  stage: str, state_dict: dict | None = None) -> None:
    with atomic_output_dir(out) as tmp:
        student.save_pretrained(tmp, state_dict=state_dict)
        copy_side_files(student_dir, tmp)
        lineage = json.loads((student_dir / "cbd.json").read_text()) if (student_dir / "cbd.json").is_file() else {}
        lineage["distillation"] = {
            "stage": stage,
            "teacher": str(teacher_dir) if teacher_dir else None,
            "student_init": str(student_dir),
            "config": asdict(config),
            "metrics": metrics,
            **(provenance or {}),
        }
        (tmp / "cbd.json").write_text(json.dumps(lineage, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_curves(history, tmp, title=stage)


def _shard_fsdp(module: StudentLoss) -> nn.Module:
    """FSDP2: each decoder layer is its own shard unit, the rest (embeddings, final norm, output layer) the root's.
    For students that do not fit one device. Checkpoints and the best weights are gathered to full tensors on the
    CPU (save_weights); generation runs under `unsharded_root`."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(module.student):
        fully_shard(layer)
    fully_shard(module)
    return module


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for candidate in ("layers", "h"):
        base = model.base_model
        if hasattr(base, candidate):
            return list(getattr(base, candidate))
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for FSDP")
