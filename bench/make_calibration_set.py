"""Writes the package's default calibration set, cbd_engine/assets/calibration/default.jsonl, from the public
instruction sets in ../shared/data/instruction (run from the repository root; the file is committed, so users never
need ../shared):

    .venv/bin/python bench/make_calibration_set.py

What goes in, and why (measured in docs/ENGINE.md, "Calibration"): rows of databricks-dolly-15k, Self-Instruct's
seed tasks and P3 (PARTS), taken in file order so the set is reproducible, and interleaved 2:1:1 so that any prefix
(importance reads the first 256 training rows) holds the same mix: a mix measured better than Dolly alone, on Dolly's
held-out rows too. Every split of the contract's hash rule is kept as it falls: training rows feed importance, dev
rows score alpha candidates, validation rows report a chain built on the set alone (the demo's).
minillm_uinst_valid.jsonl is never used: it is a second held-out set.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruction"
OUT = REPO / "cbd_engine" / "assets" / "calibration" / "default.jsonl"
PARTS = {"minillm_dolly_dev.jsonl": 236, "selfinstruct_seed_tasks.jsonl": 118, "p3_t0train_28templates.jsonl": 118}
PATTERN = ("minillm_dolly_dev.jsonl", "selfinstruct_seed_tasks.jsonl", "minillm_dolly_dev.jsonl",
           "p3_t0train_28templates.jsonl")  # the interleaving
MAX_BYTES = 300_000


def rows_of(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as handle:  # not splitlines(): rows hold U+2028
        rows = [json.loads(line) for line in handle if line.strip()]
    if name.startswith("p3"):  # 28 templates, 50 rows each in a row: take every template's first rows
        rows = [rows[i * 50 + j] for j in range(50) for i in range(28)]
    return [{"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
             "source": row.get("source") or name} for row in rows[: PARTS[name]]]


def main() -> None:
    queues = {name: rows_of(name) for name in PARTS}
    lines = []
    while any(queues.values()):
        for name in PATTERN:
            if queues[name]:
                lines.append(json.dumps(queues[name].pop(0), ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if len(text.encode()) > MAX_BYTES:
        raise SystemExit(f"{len(text.encode())} bytes: over the {MAX_BYTES} the package allows")
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {len(lines)} rows, {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
