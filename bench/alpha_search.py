"""alpha "auto" by knots against the grid at each size (issue 19): what the interpolation costs in quality, and what
it saves in time. Run by hand; results in docs/BENCHMARKS.md ("Auto alpha").

    PYTHONPATH=. .venv/bin/python bench/alpha_search.py --small ANCHOR_2 --large ANCHOR_1 [--fractions ...]

For each size between the two anchors (by default at 1/8, 3/8, 5/8 and 7/8 of the parameter gap: halfway between
the knots and the ends, where an interpolation is least informed), the model is materialized twice, with
`alpha_search="exact"` (the grid of 7 candidates on the calibration's dev rows at this size) and with the default
knots (interpolated between the pair's 3 grids, run once and cached); both are scored per row on the validation rows
of each held-out set, and the report gives knots minus exact as a paired difference with a 95% bootstrap interval
(cbd_engine.evaluation.stats). Equal alphas make equal models: their difference is 0 without scoring. The knots'
one-time cost is reported apart (their grids' own seconds). Needs ../shared (the held-out sets).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from quality import HELD_OUT, mean, row_losses


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def made(out: Path, small: Path, large: Path, size: int, search: str) -> tuple[dict, float]:
    """The model at `size` by `search`, its cbd.json and the seconds it took (0 when it exists)."""
    from cbd_engine.materialization.recipe import materialize

    seconds = 0.0
    if not (out / "cbd.json").is_file():
        started = time.monotonic()
        materialize(out, small=small, large=large, size=size, alpha_search=search, dtype="float32")
        seconds = time.monotonic() - started
    return json.loads((out / "cbd.json").read_text()), seconds


def scores(folder: Path) -> dict:
    target = folder.with_name(folder.name + ".scores.json")
    if not target.is_file():
        target.write_text(json.dumps(row_losses(folder)))
    return json.loads(target.read_text())


def main() -> None:
    from cbd_engine.evaluation.stats import paired_difference
    from cbd_engine.spec.families import ModelSpec, read_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=Path, required=True)
    parser.add_argument("--large", type=Path, required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.375, 0.625, 0.875])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cbd-alpha"))
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args()
    p_small, p_large = (ModelSpec.from_config(read_config(f)).num_params for f in (args.small, args.large))
    rows = []
    for fraction in args.fractions:
        size = round(p_small + fraction * (p_large - p_small))
        log(f"size {size} ({fraction:g} of the way)")
        exact, exact_s = made(args.work / f"exact-{fraction:g}", args.small, args.large, size, "exact")
        knots, knots_s = made(args.work / f"knots-{fraction:g}", args.small, args.large, size, "knots")
        row = {"fraction": fraction, "params": exact["params"], "alpha_exact": exact["alpha"],
               "alpha_knots": knots["alpha"], "seconds_exact": round(exact_s, 1), "seconds_knots": round(knots_s, 1),
               "knots": [(k["params"], k["alpha"], round(k["seconds"], 1)) for k in knots["alpha_search"]["knots"]]}
        if exact["alpha"] != knots["alpha"]:
            a, b = scores(args.work / f"knots-{fraction:g}"), scores(args.work / f"exact-{fraction:g}")
            for held_out in HELD_OUT:
                difference, (low, high) = paired_difference(a[held_out], b[held_out])
                row[held_out] = {"exact": round(mean(b[held_out]), 4), "knots": round(mean(a[held_out]), 4),
                                 "difference": round(difference, 4), "interval": [round(low, 4), round(high, 4)]}
        log(json.dumps(row))
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
