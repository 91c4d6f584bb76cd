"""Which weights a run keeps: the dev rows' loss (or Rouge-L of greedy answers to the dev prompts) after every
`eval_every` steps, the best so far saved aside. The contract's dev rows choose, the validation rows only report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cbd_engine.data.batches import IGNORE, Example
from cbd_engine.distillation.checkpoints import save_weights
from cbd_engine.evaluation.scoring import greedy_generate, rouge_l
from cbd_engine.spec.distill_config import DistillConfig


def improves(result: dict, best: dict, select_by: str) -> bool:
    """Lower dev loss (or higher Rouge-L on the dev rows) than the best so far; with no dev rows, every later step."""
    if "dev_loss" not in result:
        return True
    if select_by == "rouge_l":
        return result["rouge_l"] > best["rouge_l"]
    return result["dev_loss"] < best["dev_loss"]


def evaluate_and_keep_best(student: nn.Module, validate: Callable[[], dict], select_by: str, state: dict,
                            best_dir: Path) -> dict:
    result = validate()
    if improves(result, state["best"], select_by):
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
    was_training = student.training
    student.eval()
    with torch.no_grad():
        outputs = greedy_generate(student, tokenizer, prompts, max_new_tokens=config.rouge_max_new_tokens,
                                  batch_size=config.eval_batch_size, max_length=config.max_length)
    student.train(was_training)
    scores = rouge_l(outputs, references)
    return sum(scores) / max(len(scores), 1)
