"""`cbd train MODEL --data FILE --tokens N --out DIR`: continued pretraining (text) or SFT (instructions) with a
token budget; the Rand arm and recovery runs of the paper's comparisons."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cbd_cli.distill import add_config_options, config_from_args

NOT_FOR_TRAINING = ("loss", "mode", "beta", "skew", "temperature", "data_mix", "ce_weight", "steps", "max_new_tokens",
                    "sample_temperature")


def register(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser("train", help="train a model on text or instructions for a token budget")
    p.add_argument("model", type=Path, help="model folder to start from (e.g. `cbd materialize --init random`)")
    p.add_argument("--data", type=Path, required=True, help="instruction JSONL (SFT on responses) or a text file")
    p.add_argument("--tokens", type=float, required=True, help="token budget (prompt + response tokens read)")
    p.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --out")
    add_config_options(p, skip=NOT_FOR_TRAINING)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from cbd_engine.distillation.train import train
    from cbd_engine.spec.progress import TqdmProgress

    bar = TqdmProgress()
    try:
        result = train(args.model, args.data, args.out, int(args.tokens), config_from_args(args), resume=args.resume,
                       progress=bar)
    finally:
        bar.close()
    print(json.dumps(result.metrics, indent=1))
    return 0
