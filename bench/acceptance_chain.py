"""Acceptance run: a two-anchor chain from SmolLM2-135M-Instruct on Dolly, stepwise vs direct.

    .venv/bin/python bench/acceptance_chain.py --steps 40 --out /tmp/cbd-acceptance                 # this CPU
    python3 bench/acceptance_chain.py --device gpu --steps 1000 --batch-size 16 --checkpoint-every 250 \
        --data .cbd-cache/data/dolly.jsonl --out /tmp/cbd-acceptance                                # a GPU

builds (1) stepwise: source -> ~100M -> ~70M, `steps` distillation steps per anchor, and (2) direct: source -> ~70M
with 2 x `steps` steps (the same total number of student steps), each anchor pruned by the materializer (activation
importance on the training rows) and then distilled with token-level reverse KL. Prints and writes a JSON summary
of the held-out response-token loss of every anchor right after pruning and after distillation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.pipelines.chain import build_chain
from cbd_engine.spec.progress import TqdmProgress

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "minillm_dolly_dev.jsonl"


def spec(anchors: list[dict], steps: int, args: argparse.Namespace) -> dict:
    return {
        "name": "acceptance", "source": str(smollm2_135m_instruct()), "bridge": None, "anchors": anchors,
        "dataset": {"path": str(args.data), "prompt_format": "alpaca"},
        "distillation": {"loss": "reverse_kl", "mode": "off_policy", "steps": steps, "batch_size": args.batch_size,
                         "learning_rate": args.learning_rate, "max_length": args.max_length, "seed": 0,
                         "eval_every": max(steps // 2, 1), "eval_rows": 200,
                         "checkpoint_every": args.checkpoint_every},
        "device": args.device,
    }


def summarize(result, seconds: float) -> dict:
    return {"seconds": round(seconds), "anchors": [
        {"index": a.index, "params": a.params, "shape": a.shape.to_dict(),
         "loss_after_pruning": a.metrics.get("validation_loss_before"),
         "loss_after_distillation": a.metrics["validation_loss"], "best_step": a.metrics.get("best_step")}
        for a in result.anchors]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="distillation steps per stepwise anchor")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "gpu", "npu"))
    parser.add_argument("--data", type=Path, default=DOLLY, help="instruction JSONL (default: the shared Dolly set)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-acceptance"))
    parser.add_argument("--only", choices=("stepwise", "direct"))
    args = parser.parse_args()
    runs = {"stepwise": ([{"size": "100M"}, {"size": "70M"}], args.steps),
            "direct": ([{"size": "70M"}], 2 * args.steps)}
    summary = {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}}
    for name, (anchors, steps) in runs.items():
        if args.only and name != args.only:
            continue
        started = time.monotonic()
        bar = TqdmProgress()
        result = build_chain(spec(anchors, steps, args), args.out / name, resume=True, progress=bar)
        bar.close()
        summary[name] = summarize(result, time.monotonic() - started)
        print(json.dumps(summary[name], indent=1))
    (args.out / f"summary-{args.only or 'all'}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
