"""The response-token loss, the one validation loss of the engine: distillation's dev and validation passes, chains,
the materializer's alpha search, the service's new models and evaluation all read it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cbd_engine.data.batches import Example, collate, encode_rows, next_token_targets, pad_id_of, response_positions
from cbd_engine.data.rows import InstructionRow, read_instruction_rows, split_rows
from cbd_engine.nn.device import autocast_for, resolve_device
from cbd_engine.nn.loading import hidden_states, load_model, load_tokenizer, output_head
from cbd_engine.nn.losses import CHUNK_ELEMENTS
from cbd_engine.spec.progress import ProgressCallback, StageTimer, no_progress

# Runs a computation on the model: by default calls it with the model; distillation passes one that calls it inside
# the (possibly DDP- or FSDP-wrapped) loss module's forward, where a sharded student gathers its weights.
Through = Callable[[Callable[[nn.Module], torch.Tensor]], torch.Tensor]


@torch.no_grad()
def example_losses(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                   on_batch: Callable[[int], None] | None = None, through: Through | None = None,
                   ) -> list[tuple[float, int]]:
    """(cross-entropy sum, scored tokens) of each example, in the order given: the per-row numbers that paired
    comparisons of two models need (cbd_engine.evaluation.stats.paired_difference). `on_batch(rows done)`."""
    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch = collate([examples[i] for i in members], pad_id).to(device)
        scored = response_positions(batch.labels)

        def row_sums(module: nn.Module, batch=batch, scored=scored) -> torch.Tensor:
            return _row_sums(module, batch.input_ids, batch.attention_mask, batch.labels, scored, bf16)

        sums = through(row_sums) if through is not None else row_sums(model)
        for member, total, count in zip(members, sums.tolist(), scored.sum(1).tolist(), strict=True):
            results[member] = (total, int(count))
        if on_batch is not None:
            on_batch(start + len(members))
    model.train(was_training)
    return results


def _row_sums(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              scored: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Cross-entropy sums per row [batch] (float64), the output layer applied to a chunk of positions at a time."""
    head = output_head(model)
    chunk = max(1, CHUNK_ELEMENTS // int(head.weight.shape[0]))  # positions whose logits exist at once
    with autocast_for(input_ids.device, bf16):
        hidden = hidden_states(model, input_ids, attention_mask)[scored]
    targets, rows = next_token_targets(labels)[scored], scored.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for first in range(0, hidden.shape[0], chunk):
        logits = head(hidden[first : first + chunk]).float()
        token_ce = torch.nn.functional.cross_entropy(logits, targets[first : first + chunk], reduction="none")
        sums.index_add_(0, rows[first : first + chunk], token_ce.double())
    return sums


def examples_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                  on_batch: Callable[[int], None] | None = None, through: Through | None = None) -> float:
    """Mean cross-entropy per scored token over `examples` (one mean over all tokens, not a mean of row means)."""
    losses = example_losses(model, examples, pad_id, batch_size, bf16, on_batch, through)
    return sum(total for total, _ in losses) / max(sum(count for _, count in losses), 1)


def response_loss(model, tokenizer, rows: list[InstructionRow], max_length: int = 512, batch_size: int = 8,
                  prompt_format: str = "alpaca", progress: ProgressCallback = no_progress) -> float:
    """Mean per-token cross-entropy of `model` on the response tokens (and closing EOS) of `rows`; prompt and
    padding are not scored. The validation loss of chains, of the service's new models, and of evaluation."""
    examples = encode_rows(tokenizer, rows, prompt_format, max_length)
    timer = StageTimer("validation", len(examples), progress)
    timer.update(0)
    return examples_loss(model, examples, pad_id_of(tokenizer), batch_size, on_batch=timer.update)


def validation_loss(model_dir: str | Path, data_path: str | Path, max_rows: int | None = 200, max_length: int = 512,
                    batch_size: int = 8, prompt_format: str = "alpaca", device: str = "cpu",
                    progress: ProgressCallback = no_progress) -> float:
    """response_loss of a model folder on the contract's validation rows of an instruction JSONL file."""
    valid = split_rows(read_instruction_rows(data_path)).validation
    if not valid:
        raise ValueError(f"{data_path} has no validation rows (sha256 of instruction + input is 0 mod 10)")
    model = load_model(model_dir, resolve_device(device))
    return response_loss(model, load_tokenizer(model_dir), valid[:max_rows], max_length, batch_size, prompt_format,
                         progress)
