"""Acceptance run of `mode: "minillm"` (CPU): one anchor step, SmolLM2-135M-Instruct teaching a student pruned from it
to ~100M, on Dolly.

    OMP_NUM_THREADS=1 .venv/bin/python bench/acceptance_minillm.py --steps 16 --out /tmp/cbd-minillm

Prunes the student once (`materialize(size="100M")`, activation importance on Dolly's training rows, float32; kept in
OUT/student and reused), then runs `distill` in minillm mode and prints a JSON summary: the response-token loss on
Dolly's validation rows before and after, the best step, the time spent sampling rollouts, scoring them and updating,
and the settings that depart from the paper's (appendix B).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cbd_engine.data.batches import encode_file
from cbd_engine.distillation.recipe import distill
from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.materialization.recipe import materialize
from cbd_engine.nn.loading import load_tokenizer
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import TqdmProgress

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "minillm_dolly_dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16, help="policy updates (optimizer steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch of rollouts")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--lm-data", help="plain-text file for the language-modeling term (off by default)")
    parser.add_argument("--eval-rows", type=int, default=200, help="validation rows (Dolly has 110)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-minillm"))
    args = parser.parse_args()

    teacher, student = smollm2_135m_instruct(), args.out / "student"
    started = time.monotonic()
    if not (student / "model.safetensors").is_file():
        materialize(student, large=teacher, size="100M", calibration=DOLLY, dtype="float32")
    pruning_seconds = time.monotonic() - started

    config = DistillConfig(mode="minillm", steps=args.steps, batch_size=args.batch_size, ppo_epochs=args.ppo_epochs,
                           max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                           learning_rate=args.learning_rate, lm_data=args.lm_data, eval_rows=args.eval_rows,
                           eval_every=max(args.steps // 2, 1), device="cpu", seed=0)
    train, valid = encode_file(load_tokenizer(student), DOLLY, config.prompt_format, config.max_length)
    bar = TqdmProgress()
    started = time.monotonic()
    result = distill(teacher, student, train, valid, args.out / "distilled", config, progress=bar)
    bar.close()
    summary = {"settings": {**vars(args), "out": str(args.out)}, "pruning_seconds": round(pruning_seconds),
               "distill_seconds": round(time.monotonic() - started), "metrics": result.metrics}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
