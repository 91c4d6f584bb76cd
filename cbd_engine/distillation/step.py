"""One optimizer step's gradients: the student's loss as the one module that DDP or FSDP wraps, the loss sums of a
batch, their accumulation over micro-batches and ranks, and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from cbd_engine.data.batches import IGNORE, Batch, next_token_targets
from cbd_engine.distillation.teacher_cache import TeacherCache
from cbd_engine.nn.device import autocast_for
from cbd_engine.nn.distributed import all_reduce_sum, world
from cbd_engine.nn.loading import hidden_states, output_head
from cbd_engine.nn.losses import LossConfig, chunked_token_losses
from cbd_engine.spec.distill_config import DistillConfig


# the student's loss as one module, so DDP/FSDP see every student computation inside forward
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


class PathStep(Protocol):
    """A trained path's part of one step (interpolation.py's line, nested.py's widths): divergence sums by part,
    each part's weight in the loss, and the step's own numbers for the loss curve."""

    @property
    def weights(self) -> dict[str, float]: ...

    def stats(self) -> dict: ...

    def sums(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
             targets: torch.Tensor, teacher_hidden, teacher_head: nn.Module | None, student_hidden: torch.Tensor,
             config: LossConfig) -> dict[str, torch.Tensor]: ...


class TrainedPath(Protocol):
    """distillation.interpolation's kinds (interpolation.LineTraining, nested.NestedTraining): each step's part, and
    the dev numbers that keep a checkpoint."""

    def step(self, rng: random.Random) -> PathStep: ...

    def selection(self, student: nn.Module, dev_loss: float,
                  dev_loss_of: Callable[[nn.Module], float]) -> dict: ...


def batch_loss_sums(student_loss: nn.Module, teacher: nn.Module | TeacherCache | None, batch: Batch, ce_only: bool,
                    need_ce: bool = True, path: PathStep | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(divergence sum over all scored tokens, cross-entropy sum over reference-response tokens, and with `path` its
    divergence sums by part) of one batch."""
    targets = next_token_targets(batch.labels)
    scored = targets != IGNORE
    ce_targets = torch.where(batch.reference[:, None], targets, torch.full_like(targets, IGNORE))
    teacher_hidden, teacher_head = None, None
    if not ce_only and isinstance(teacher, TeacherCache):
        teacher_hidden = teacher.for_batch(batch)  # the teacher's top-k, cached: no teacher forward
    elif not ce_only and teacher is not None:
        teacher_hidden, teacher_head = teacher_hidden_states(teacher, batch, scored), output_head(teacher)

    def sums(student: nn.Module, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[scored]
        div_sum, ce_sum = chunked_token_losses(hidden, output_head(student), ce_targets[scored], teacher_hidden,
                                               teacher_head, config, need_ce or ce_only)
        if path is None or ce_only:
            return div_sum, ce_sum, {}
        return div_sum, ce_sum, path.sums(student, batch.input_ids, batch.attention_mask, scored, ce_targets[scored],
                                          teacher_hidden, teacher_head, hidden, config)

    return student_loss(sums)


def accumulate_gradients(student_loss: nn.Module, teacher: nn.Module | TeacherCache | None, batches: list[Batch],
                         config: DistillConfig, device: torch.device, bf16: bool, ce_only: bool,
                         path: PathStep | None = None) -> tuple[float, float, float, float, dict[str, float]]:
    """Backward over this rank's micro-batches of one step. Each micro-batch contributes its loss *sums* divided by
    the token counts of the whole global batch (all micro-batches, all ranks), so the accumulated gradient is the
    same for any split into ranks and micro-batches. With `path`, each of its parts' divergence joins the loss at its
    weight. Returns global (divergence sum, cross-entropy sum, scored tokens, reference tokens, the path's divergence
    sums by part)."""
    world_size = world()[1]
    local = [sum(b.num_response_tokens for b in batches), sum(b.num_reference_tokens for b in batches)]
    global_tokens, global_reference = all_reduce_sum(local, device)
    div_total, ce_total = 0.0, 0.0
    path_totals = dict.fromkeys(path.weights if path is not None else (), 0.0)
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        defer_sync = world_size > 1 and index < len(batches) - 1 and hasattr(student_loss, "no_sync")
        with student_loss.no_sync() if defer_sync else contextlib.nullcontext(), autocast_for(device, bf16):
            div_sum, ce_sum, path_sums = batch_loss_sums(student_loss, teacher, batch, ce_only,
                                                         need_ce=config.ce_weight > 0, path=path)
            if ce_only:
                loss = ce_sum / max(global_reference, 1)
            else:
                loss = div_sum / max(global_tokens, 1) + config.ce_weight * ce_sum / max(global_reference, 1)
            for part, part_sum in path_sums.items():
                loss = loss + path.weights[part] * part_sum / max(global_tokens, 1)
                path_totals[part] += float(part_sum.detach())
            (loss * world_size).backward()  # DDP averages gradients over ranks; the sums want them added
        div_total += float(div_sum.detach())
        ce_total += float(ce_sum.detach())
    div_total, ce_total, *totals = all_reduce_sum([div_total, ce_total, *path_totals.values()], device)
    return div_total, ce_total, global_tokens, global_reference, dict(zip(path_totals, totals, strict=True))


def lr_lambda(config: DistillConfig) -> Callable[[int], float]:
    warmup = config.warmup_steps if config.warmup_steps is not None else max(config.steps // 20, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(config.steps - warmup, 1), 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
