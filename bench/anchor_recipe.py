"""The anchor recipe's parts at the CPU budget of docs/RESULTS.md (docs/DISTILLATION.md, "The anchor recipe").

    .venv/bin/python bench/anchor_recipe.py [RUN ...] [--out /tmp/cbd-recipe]

Each RUN prunes SmolLM2-135M-Instruct to a ~100M shape (activation importance on Dolly's first 256 training rows),
distills it 60 steps of 4 rows x 256 tokens on Dolly's training rows (dev rows pick the kept checkpoint), and
scores it on Dolly's validation rows and UInst's first 100 (response tokens, max length 256). The second-step runs
(A70, U70) cut anchor 1 (the F-fkl-3e-4 run) to ~70M and distill from it. Without RUN, all of them, in order
(about 8 minutes each on an idle 2-core CPU). One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruction"
DOLLY, UINST = DATA / "minillm_dolly_dev.jsonl", DATA / "minillm_uinst_valid.jsonl"
SHAPES = {"U": (477, 1280, 9, 3), "M": (504, 1152, 9, 3), "F": (576, 896, 9, 3),  # ~100M: hidden, FFN, heads/KV
          "A70": (504, 448, 9, 3), "U70": (432, 704, 9, 3)}  # ~70M from F: FFN first, one fraction
RUNS = {  # name: (shape, loss, learning rate, from anchor 1)
    "U-rkl-3e-4": ("U", "reverse_kl", 3e-4, False), "U-fkl-3e-4": ("U", "forward_kl", 3e-4, False),
    "M-fkl-3e-4": ("M", "forward_kl", 3e-4, False), "F-fkl-3e-4": ("F", "forward_kl", 3e-4, False),
    "F-fkl-1e-3": ("F", "forward_kl", 1e-3, False), "F-fkl-1e-4": ("F", "forward_kl", 1e-4, False),
    "F-jsd-3e-4": ("F", "jsd", 3e-4, False),
    "A70-fkl": ("A70", "forward_kl", 3e-4, True), "U70-fkl": ("U70", "forward_kl", 3e-4, True),
}


def score(folder: Path) -> dict:
    from cbd_engine.data.rows import read_instruction_rows, split_rows
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import response_loss

    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    held_out = {"dolly": split_rows(read_instruction_rows(DOLLY)).validation,
                "uinst": split_rows(read_instruction_rows(UINST)).validation[:100]}
    return {name: response_loss(model, tokenizer, rows, 256) for name, rows in held_out.items()}


def run(name: str, out: Path) -> dict:
    from cbd_engine.distillation.recipe import distill
    from cbd_engine.io.zoo import smollm2_135m_instruct
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.spec.distill_config import DistillConfig
    from cbd_engine.spec.families import ModelSpec, read_config

    shape_key, loss, learning_rate, second = RUNS[name]
    source = smollm2_135m_instruct()
    start = out / "F-fkl-3e-4" / "model" if second else source
    if second and not (start / "config.json").is_file():
        run("F-fkl-3e-4", out)
    hidden, ffn, heads, kv = SHAPES[shape_key]
    shape = replace(ModelSpec.from_config(read_config(start)).shape, hidden_size=hidden, intermediate_size=ffn,
                    num_heads=heads, num_kv_heads=kv)
    pruned = out / f"pruned-{shape_key}"  # the second step's shapes are cut from anchor 1
    if not (pruned / "config.json").is_file():
        materialize(pruned, large=start, shape=shape, calibration=DOLLY, dtype="float32")
    config = DistillConfig(loss=loss, steps=60, batch_size=4, learning_rate=learning_rate, max_length=256,
                           eval_every=20, device="cpu")
    started = time.monotonic()
    examples = ChainData.load({"path": str(DOLLY)}, source, config).examples
    result = distill(start, pruned, examples, out / name / "model", config, work_dir=out / name / "work", resume=True)
    keys = ("validation_loss_before", "validation_loss", "dev_loss_before", "dev_loss", "best_step")
    return {"name": name, "seconds": round(time.monotonic() - started), **{k: result.metrics[k] for k in keys},
            **score(out / name / "model")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-recipe"))
    args = parser.parse_args()
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}")
    for name in args.runs or RUNS:
        record_path = args.out / name / "result.json"
        if not record_path.is_file():
            record_path.parent.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps(run(name, args.out)))
        print(record_path.read_text(), flush=True)


if __name__ == "__main__":
    main()
