"""Plain training with a token budget: continued pretraining on text or SFT on instructions (issue 5).

It is the "trained on N tokens" arm of the paper's comparisons (Rand: a random init trained from scratch) and the
recovery or fine-tuning run of a materialized model. The loop is the distillation stage's with cross-entropy only
(`distill(None, ...)`), so checkpoints, resume, curves, validation and best-checkpoint selection are one piece of
code. The budget fixes the schedule before the first step: steps = tokens / (batch size x mean tokens of a
training example), rounded, and the warm-up and cosine decay span exactly those steps. Tokens are the ones the
model reads (prompt and response, no padding); the curves record them per step (`tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cbd_engine.data.batches import Example, encode_file
from cbd_engine.distillation.recipe import DistillResult, distill
from cbd_engine.nn.loading import load_tokenizer
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import ProgressCallback, no_progress


def steps_for_budget(examples: list[Example], tokens: int, batch_size: int) -> int:
    """The number of optimizer steps whose batches of `batch_size` read closest to `tokens` tokens of `examples`,
    counting the examples' mean length per row (what whole epochs read)."""
    if tokens < 1:
        raise ValueError(f"the token budget must be positive, got {tokens}")
    mean_length = sum(len(example) for example in examples) / max(len(examples), 1)
    return max(1, round(tokens / (batch_size * mean_length)))


def train(model_dir: str | Path, data: str | Path, out: str | Path, tokens: int, config: DistillConfig | None = None,
          *, resume: bool = False, progress: ProgressCallback = no_progress,
          should_stop: Callable[[], bool] | None = None) -> DistillResult:
    """Train `model_dir` on `data` (instruction JSONL: SFT on the responses; text: every token) for a budget of
    `tokens` and write the best checkpoint by dev loss to `out` (a Hugging Face folder with curves)."""
    config = config or DistillConfig()
    examples = encode_file(load_tokenizer(model_dir), data, config.prompt_format, config.max_length)
    if not examples.train:
        raise ValueError(f"{data} gives no training examples at max_length {config.max_length}")
    steps = steps_for_budget(examples.train, tokens, config.batch_size)
    config = replace(config, loss="ce", mode="off_policy", ce_weight=0.0, steps=steps)
    provenance = {"role": "train", "data": str(data), "token_budget": tokens}
    return distill(None, model_dir, examples, out, config, resume=resume, stage="train", provenance=provenance,
                   progress=progress, should_stop=should_stop)
