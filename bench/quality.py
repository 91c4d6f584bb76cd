"""The quality of what the factory hands out by default, on held-out rows (docs/RESULTS.md, "Defaults").

    .venv/bin/python bench/quality.py calibration [--size 100M] [--out /tmp/cbd-quality]

calibration: SmolLM2-135M-Instruct pruned to --size by `cbd materialize --large SOURCE --size S` with no other flag
(the package's default calibration set), against the same prune given Dolly's instruction rows explicitly, against
weight magnitude; each scored on Dolly's validation rows and on minillm_uinst_valid.jsonl's (a second held-out set),
with paired per-row differences and 95% bootstrap intervals. Needs ../shared (the repository's data) for scoring.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruction"
HELD_OUT = {"dolly": DATA / "minillm_dolly_dev.jsonl", "uinst": DATA / "minillm_uinst_valid.jsonl"}
MAX_LENGTH = 256


def row_losses(model_dir: Path) -> dict[str, list[tuple[float, int]]]:
    """Per-row (loss sum, tokens) on each held-out set's validation rows."""
    from cbd_engine.data.batches import encode_rows, pad_id_of
    from cbd_engine.data.rows import read_instruction_rows, split_rows
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import example_losses

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    result = {}
    for name, path in HELD_OUT.items():
        examples = encode_rows(tokenizer, split_rows(read_instruction_rows(path)).validation, max_length=MAX_LENGTH)
        result[name] = example_losses(model, examples, pad_id_of(tokenizer))
    return result


def mean(rows: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in rows) / sum(c for _, c in rows)


def calibration(size: str, out: Path) -> list[dict]:
    from cbd_engine.evaluation.stats import paired_difference
    from cbd_engine.io.zoo import smollm2_135m_instruct
    from cbd_engine.materialization.recipe import materialize

    source = smollm2_135m_instruct()
    ways = {"default (no flag)": {}, "dolly rows given": {"calibration": HELD_OUT["dolly"]},
            "magnitude": {"importance": "magnitude"}}
    losses, records = {}, []
    for name, options in ways.items():
        folder = out / f"prune-{size}-{name.split(' ')[0]}"
        started = time.monotonic()
        if not (folder / "config.json").is_file():
            materialize(folder, large=source, size=size, dtype="float32", **options)
        seconds = time.monotonic() - started
        losses[name] = row_losses(folder)
        records.append({"way": name, "seconds": round(seconds, 1), **{k: mean(v) for k, v in losses[name].items()}})
    for record in records:
        for held_out in HELD_OUT:
            reference = losses["dolly rows given"][held_out]
            value, (low, high) = paired_difference(losses[record["way"]][held_out], reference)
            record[f"{held_out} vs dolly rows"] = [value, low, high]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("calibration",))
    parser.add_argument("--size", default="100M")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for record in calibration(args.size, args.out):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
