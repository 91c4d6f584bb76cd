"""What every export's measurement shares, whatever runs the export (llama.cpp, ONNX Runtime GenAI): the chain's
validation rows as token ids and the response-token cross-entropy of a runtime's logits.

The loss is cbd_engine.nn.validation's, computed outside torch: rows tokenized by the model's own tokenizer in the
chain's prompt format, the logits at position t scored against labels[t + 1] where that label is a response token,
one mean over all scored tokens of all rows (not a mean of row means), so an export's loss and the safetensors
model's are the same quantity on the same ids. A runtime only has to give logits (or what yields them) per row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbd_engine.data.batches import IGNORE, Example, encode_rows
from cbd_engine.data.rows import read_instruction_rows, split_rows
from cbd_engine.spec.progress import ProgressCallback, StageTimer, no_progress


def validation_examples(tokenizer_folder: str | Path, data_path: str | Path, max_rows: int | None,
                        max_length: int, prompt_format: str) -> list[Example]:
    """The validation rows of an instruction file (sha256 of instruction + input is 0 mod 10), encoded; rows are
    cut to `max_length` (the caller's min of the wanted length and the runtime's context)."""
    from cbd_engine.nn.loading import load_tokenizer

    rows = split_rows(read_instruction_rows(data_path)).validation[:max_rows]
    if not rows:
        raise ValueError(f"{data_path} has no validation rows (sha256 of instruction + input is 0 mod 10)")
    return encode_rows(load_tokenizer(tokenizer_folder), rows, prompt_format, max_length)


def scored_positions(example: Example) -> tuple[np.ndarray, np.ndarray]:
    """(positions whose logits are scored, their target ids): position t predicts labels[t + 1]."""
    labels = np.asarray(example.labels)
    positions = np.nonzero(labels[1:] != IGNORE)[0]
    return positions, labels[positions + 1]


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """sum over rows of logsumexp(logits) - logits[target], in float64 ([rows, vocab] logits)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def mean_loss(examples: list[Example], example_loss: Callable[[Example], tuple[float, int]],
              progress: ProgressCallback = no_progress) -> float:
    """One mean over every scored token of `examples`; `example_loss` gives (loss sum, scored tokens) of a row."""
    timer = StageTimer("validation", len(examples), progress)
    total, count = 0.0, 0
    for done, example in enumerate(examples, 1):
        loss, scored = example_loss(example)
        total, count = total + loss, count + scored
        timer.update(done)
    return total / max(count, 1)
