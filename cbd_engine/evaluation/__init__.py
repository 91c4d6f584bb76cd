"""Layer 5, beside materialization: evaluation of a model folder on local task files:
`evaluate(model_dir, ["TYPE=PATH", ...])` -> results dict.

Task types (TYPE=PATH; the result key is "TYPE:file-stem"):
- perplexity       plain text, in windows of max_length tokens; token-level perplexity
- response_loss    instruction JSONL: mean cross-entropy per response token (response + EOS, prompt unscored)
- rougeL           instruction JSONL: Rouge-L of greedy responses to the paper's prompt against `output`
- summarization    summarization JSONL: Rouge-L of greedy summaries (the paper's appendix-B prompt) against `summary`
- multiple_choice  multiple-choice JSONL: acc and acc_norm by log-likelihood (see tasks.py for the prompts)
Every metric comes with a 95% confidence interval (see stats.py). `limit` keeps the first N rows (text: windows).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cbd_engine.data.rows import InstructionRow, read_instruction_rows
from cbd_engine.evaluation.stats import mean_ci, ratio_ci, wilson_ci
from cbd_engine.evaluation.tasks import choice_requests, read_choice_rows, read_summarization_rows
from cbd_engine.spec.options import TASK_TYPES
from cbd_engine.spec.progress import ProgressCallback, StageTimer, no_progress

STOP_STRINGS = ("###",)  # the template's section marker: a model that writes one has started a new turn


@dataclass(frozen=True)
class Settings:
    limit: int | None = None
    shots: int = 0
    batch_size: int = 16
    max_length: int = 2048
    max_new_tokens: int = 128
    prompt_format: str = "alpaca"
    fewshot_path: str | None = None  # multiple choice: the dev file k-shot examples come from (default: the task's)


@dataclass(frozen=True)
class TaskSpec:
    type: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.type}:{self.path.stem}"

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        kind, sep, path = text.partition("=")
        if not sep or kind not in TASK_TYPES or not path:
            raise ValueError(f"task {text!r} is not TYPE=PATH with TYPE one of {', '.join(TASK_TYPES)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"task {kind}: {path} does not exist")
        return cls(kind, Path(path))


def metric(value: float, ci: tuple[float, float] | None) -> dict:
    return {"value": value, "ci95": list(ci) if ci else None}


def parse_tasks(tasks: list[str]) -> list[TaskSpec]:
    specs = [TaskSpec.parse(task) for task in tasks]
    duplicates = [key for key, count in Counter(spec.key for spec in specs).items() if count > 1]
    if not specs or duplicates:
        raise ValueError(f"tasks must be given and have distinct TYPE:file-stem keys (repeated: {duplicates})")
    return specs


def evaluate(model_dir: str | Path, tasks: list[str], limit: int | None = None, shots: int = 0, batch_size: int = 16,
             progress: ProgressCallback = no_progress, device: str = "auto", max_length: int = 2048,
             max_new_tokens: int = 128, prompt_format: str = "alpaca", fewshot_path: str | None = None) -> dict:
    """Scores of the model in `model_dir` on each task; the structure `cbd eval` writes to results.json."""
    from cbd_engine.nn.device import resolve_device
    from cbd_engine.nn.loading import load_model, load_tokenizer

    specs = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    model = load_model(model_dir, resolve_device(device)).eval()
    tokenizer = load_tokenizer(model_dir)
    positions = getattr(model.config, "max_position_embeddings", None) or max_length
    settings = Settings(limit, shots, batch_size, min(max_length, positions), max_new_tokens, prompt_format,
                        fewshot_path)
    results = {}
    for spec in specs:
        result = RUNNERS[spec.type](model, tokenizer, spec, settings, progress)
        results[spec.key] = {"type": spec.type, "path": str(spec.path), **result}
    return {"model": str(model_dir), "settings": asdict(settings), "tasks": results}


def _timer(spec: TaskSpec, total: int, progress: ProgressCallback) -> Callable[[int], None]:
    timer = StageTimer(f"eval {spec.key}", total, progress)
    timer.update(0)
    return timer.update


def _instruction_rows(spec: TaskSpec, settings: Settings) -> list[InstructionRow]:
    rows = read_instruction_rows(spec.path)[: settings.limit]
    if not rows:
        raise ValueError(f"{spec.path} has no rows")
    return rows


def run_multiple_choice(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback) -> dict:
    from cbd_engine.evaluation.scoring import encode_pair, loglikelihoods

    rows = read_choice_rows(spec.path, settings.limit)
    if not rows:
        raise ValueError(f"{spec.path} has no rows")
    pool = read_choice_rows(settings.fewshot_path) if settings.fewshot_path else read_choice_rows(spec.path)
    requests = [encode_pair(tokenizer, *request) for request in choice_requests(rows, pool, settings.shots)]
    scores = loglikelihoods(model, requests, settings.batch_size, settings.max_length,
                            _timer(spec, len(requests), progress))
    correct = correct_norm = 0
    offset = 0
    for row in rows:
        logliks = [total for total, _ in scores[offset : offset + len(row.choices)]]
        offset += len(row.choices)
        normalized = [loglik / max(length, 1) for loglik, length in zip(logliks, row.scored_lengths(), strict=True)]
        correct += _argmax(logliks) == row.label
        correct_norm += _argmax(normalized) == row.label
    n = len(rows)
    majority = Counter(row.label for row in rows).most_common(1)[0][1] / n
    return {"rows": n, "metrics": {"acc": metric(correct / n, wilson_ci(correct, n)),
                                   "acc_norm": metric(correct_norm / n, wilson_ci(correct_norm, n))},
            # what a model without knowledge scores: guessing, and always answering the most frequent label
            "baselines": {"chance": sum(1 / len(row.choices) for row in rows) / n, "majority_label": majority}}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _nll(scores: list[tuple[float, int]]) -> tuple[float, tuple[float, float] | None]:
    """Mean negative log-likelihood per scored token, pooled over requests, with its interval."""
    return ratio_ci([-total for total, _ in scores], [count for _, count in scores])


def run_response_loss(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback) -> dict:
    # cbd_engine.nn.loading.response_loss gives the same mean (tested) but no per-row sums, so no interval: the rows are
    # encoded by the same encode_rows and scored here
    from cbd_engine.data.batches import encode_rows
    from cbd_engine.evaluation.scoring import loglikelihoods

    examples = encode_rows(tokenizer, _instruction_rows(spec, settings), settings.prompt_format, settings.max_length)
    requests = [(e.input_ids[: e.prompt_length], e.input_ids[e.prompt_length :]) for e in examples]
    scores = loglikelihoods(model, requests, settings.batch_size, settings.max_length,
                            _timer(spec, len(requests), progress))
    loss, ci = _nll(scores)
    return {"rows": len(examples), "metrics": {"loss": metric(loss, ci)}, "tokens": sum(count for _, count in scores)}


def run_perplexity(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback) -> dict:
    """Windows of max_length tokens overlapping by one, so every token but the first is scored exactly once."""
    from cbd_engine.evaluation.scoring import loglikelihoods

    ids = tokenizer(spec.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"{spec.path} has fewer than two tokens")
    step = settings.max_length - 1
    requests = [([ids[start - 1]], ids[start : start + step]) for start in range(1, len(ids), step)]
    requests = requests[: settings.limit]
    scores = loglikelihoods(model, requests, settings.batch_size, settings.max_length,
                            _timer(spec, len(requests), progress))
    nll, ci = _nll(scores)
    perplexity_ci = (math.exp(ci[0]), math.exp(ci[1])) if ci else None
    return {"rows": len(requests), "tokens": sum(count for _, count in scores),
            "metrics": {"perplexity": metric(math.exp(nll), perplexity_ci), "nll": metric(nll, ci)}}


def _rouge_result(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback,
                  rows: list[InstructionRow]) -> dict:
    from cbd_engine.data.batches import format_prompt
    from cbd_engine.evaluation.scoring import greedy_generate, rouge_l

    prompts = [format_prompt(tokenizer, row, settings.prompt_format)[0] for row in rows]
    # the chat template writes its own special tokens, as in batches.encode_row
    predictions = greedy_generate(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                                  settings.max_length, STOP_STRINGS, _timer(spec, len(prompts), progress),
                                  add_special_tokens=settings.prompt_format == "alpaca")
    mean, ci = mean_ci(rouge_l(predictions, [row.output for row in rows]))
    examples = [{"prompt": prompt, "prediction": prediction, "reference": row.output}
                for prompt, prediction, row in zip(prompts[:3], predictions[:3], rows[:3], strict=True)]
    return {"rows": len(rows), "metrics": {"rougeL": metric(mean, ci)}, "examples": examples}


def run_rouge(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback) -> dict:
    return _rouge_result(model, tokenizer, spec, settings, progress, _instruction_rows(spec, settings))


def run_summarization(model, tokenizer, spec: TaskSpec, settings: Settings, progress: ProgressCallback) -> dict:
    rows = read_summarization_rows(spec.path, settings.limit)
    if not rows:
        raise ValueError(f"{spec.path} has no rows")
    return _rouge_result(model, tokenizer, spec, settings, progress, rows)


RUNNERS = {"perplexity": run_perplexity, "response_loss": run_response_loss, "rougeL": run_rouge,
           "summarization": run_summarization, "multiple_choice": run_multiple_choice}
