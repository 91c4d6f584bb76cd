"""Acceptance run: a SeqKD bridge across architectures and vocabularies (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/acceptance_bridge.py --out /tmp/bridge/acceptance

SmolLM2-135M-Instruct (Llama, 49152 tokens) answers the first `--prompts` training prompts of Dolly and the first
`--valid-prompts` validation prompts; a fresh GPT-2-architecture bridge with GPT-2's own tokenizer (50257 tokens)
learns the training answers by cross-entropy and is anchor 0 of a chain with one pruned GPT-2 anchor. Then a second
chain from the same source and the same generation parameters (bridge and anchor trained for a few steps only)
shows the answers coming from the cache. Prints and writes a JSON summary: generation throughput, the bridge's loss
on held-out source answers before and after, the pruned anchor's, and the second chain's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.pipelines.chain import build_chain
from cbd_engine.spec.progress import TqdmProgress

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "minillm_dolly_dev.jsonl"


def spec(args: argparse.Namespace, epochs: float, anchor_steps: int) -> dict:
    hidden, heads = args.hidden, args.hidden // 64
    bridge = {"model": {"family": "gpt2", "num_layers": args.layers, "hidden_size": hidden, "num_heads": heads,
                        "intermediate_size": 4 * hidden},
              "method": "seqkd", "num_samples": args.prompts, "epochs": epochs, "learning_rate": args.learning_rate,
              "generation": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.new_tokens,
                             "seed": 0, "batch_size": 16, "max_length": args.max_length}}
    anchor = {"num_layers": max(args.layers // 2, 1), "hidden_size": hidden // 2, "num_heads": heads // 2,
              "num_kv_heads": heads // 2, "head_dim": 64, "intermediate_size": 2 * hidden}
    return {"name": "bridge-acceptance", "source": str(smollm2_135m_instruct()), "bridge": bridge,
            "anchors": [{"shape": anchor}], "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"},
            "distillation": {"loss": "reverse_kl", "steps": anchor_steps, "batch_size": args.batch_size,
                             "learning_rate": args.learning_rate, "max_length": args.max_length, "seed": 0,
                             "eval_rows": args.valid_prompts, "eval_every": args.eval_every,
                             "checkpoint_every": 20},
            "device": "cpu"}


def build(args: argparse.Namespace, name: str, epochs: float, anchor_steps: int) -> dict:
    stages: set[str] = set()
    bar = TqdmProgress()

    def progress(event) -> None:
        stages.add(event.stage)
        bar(event)

    started = time.monotonic()
    result = build_chain(spec(args, epochs, anchor_steps), args.out / name, resume=True, progress=progress)
    bar.close()
    lineage = json.loads((result.anchors[0].path / "cbd.json").read_text())["distillation"]
    generations = lineage["generations"]
    return {
        "seconds": round(time.monotonic() - started),
        "generated_this_run": sorted(stage for stage in stages if "generate" in stage),
        "generation": {name: {**stats, "response_tokens_per_second": round(stats["response_tokens"] /
                                                                            stats["seconds"], 1)}
                       for name, stats in generations.items()},
        "anchors": [{"index": a.index, "params": a.params, "shape": a.shape.to_dict(),
                     "validation_loss_before": a.metrics.get("validation_loss_before"),
                     "validation_loss": a.metrics["validation_loss"], "best_step": a.metrics.get("best_step"),
                     "steps": a.metrics.get("steps"), "train_seconds": a.metrics.get("seconds_this_run")}
                    for a in result.anchors],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=240, help="training prompts the source answers")
    parser.add_argument("--valid-prompts", type=int, default=40, help="validation prompts (held-out answers)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--anchor-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bridge/acceptance"))
    args = parser.parse_args()
    os.environ.setdefault("CBD_GENERATIONS_DIR", str(args.out / "generations"))
    summary = {"settings": vars(args) | {"out": str(args.out)}}
    summary["first"] = build(args, "first", args.epochs, args.anchor_steps)
    print(json.dumps(summary["first"], indent=1))
    summary["second"] = build(args, "second", 0.1, 1)  # same source, prompts, parameters: the cache answers
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
