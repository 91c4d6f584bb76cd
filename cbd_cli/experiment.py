"""`cbd experiment SPEC --out DIR`: a resumable grid of chains, interpolated models, training runs and evaluations
that writes the paper's tables (results.md, results.csv) and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbd_cli.distill import read_spec


def register(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser("experiment", help="run (or resume) an experiment grid and write its tables")
    p.add_argument("spec", type=Path, help="SPEC.json or SPEC.yaml (see docs/RESULTS.md)")
    p.add_argument("--out", type=Path, required=True, help="folder for everything the grid makes; rerun to resume")
    p.add_argument("--plan", action="store_true", help="print the models of the grid, then stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cbd_engine.pipelines.experiment import plan_experiment, run_experiment
    from cbd_engine.spec.progress import TqdmProgress

    spec = read_spec(args.spec)
    if args.plan:
        for unit in plan_experiment(spec, args.out).models:
            print(f"{unit.kind:12} {unit.id:32} {unit.path}")
        return 0
    bar = TqdmProgress()
    try:
        run_experiment(spec, args.out, progress=bar, command=["cbd", *sys.argv[1:]])
    finally:
        bar.close()
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.csv'} and plots")
    return 0
