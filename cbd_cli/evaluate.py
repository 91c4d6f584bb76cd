"""`cbd eval`: score a model folder on local task files and write results.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_HELP = ("TYPE=PATH, repeatable; TYPE is perplexity (text), response_loss or rougeL (instruction JSONL), "
             "summarization (summarization JSONL) or multiple_choice (multiple-choice JSONL)")


def register(subcommands: argparse._SubParsersAction) -> None:
    from cbd_engine.spec.options import DEVICES
    p = subcommands.add_parser("eval", help="evaluate a model on local task files (metrics with 95%% CIs)")
    p.add_argument("model", help="a Hugging Face model folder")
    p.add_argument("--task", action="append", required=True, help=TASK_HELP)
    p.add_argument("--limit", type=int, help="score the first N rows of each task (perplexity: N windows)")
    p.add_argument("--shots", type=int, default=0, help="k-shot examples for multiple choice (never the scored row)")
    p.add_argument("--fewshot-file", help="multiple-choice JSONL the k-shot examples come from (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (capped by the model's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length for rougeL/summarization")
    p.add_argument("--prompt-format", default="alpaca", choices=("alpaca", "chat"),
                   help="instruction prompts: the paper's template or the tokenizer's chat template")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", required=True, help="results.json to write")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from cbd_engine.evaluation import evaluate
    from cbd_engine.spec.progress import TqdmProgress

    progress = TqdmProgress()
    try:
        results = evaluate(args.model, args.task, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                           progress=progress, device=args.device, max_length=args.max_length,
                           max_new_tokens=args.max_new_tokens, prompt_format=args.prompt_format,
                           fewshot_path=args.fewshot_file)
    finally:
        progress.close()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for key, task in results["tasks"].items():
        scores = ", ".join(f"{name} {m['value']:.4f}" + (f" [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
                                                          if m["ci95"] else "")
                           for name, m in task["metrics"].items())
        print(f"{key} ({task['rows']} rows): {scores}")
    return 0
