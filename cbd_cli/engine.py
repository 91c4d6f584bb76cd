"""`cbd materialize`, `cbd inspect`, `cbd import-gguf`, `cbd export`: the materializer's command-line face."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subcommands: argparse._SubParsersAction) -> None:
    from cbd_engine.spec.export import DEFAULT_QUANT, EXPORT_FORMATS, GGUF_QUANTS, ONNX_PRECISIONS
    from cbd_engine.spec.options import (
        ALIGNMENTS,
        ALPHA_SEARCHES,
        DTYPES,
        GROWS,
        IMPORTANCES,
        INITS,
        MIXES,
        REFINE_STEPS,
    )
    from cbd_engine.spec.shapes import PRUNE_ORDER, PRUNE_ORDERS

    p = subcommands.add_parser("materialize", help="build a model of any size from one or two anchors")
    p.add_argument("--small", help="the smaller anchor (a Hugging Face folder)")
    p.add_argument("--large", help="the larger anchor (a Hugging Face folder)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--size", help="total parameters: 100000000, 100M, 1.2B")
    target.add_argument("--shape", help='JSON: {"num_layers", "hidden_size", "num_heads", "num_kv_heads", '
                                        '"head_dim", "intermediate_size"}')
    target.add_argument("--fits", metavar="MEMORY",
                        help="a memory budget (300MB: MB = 10^6 bytes; 1.5GiB: GiB = 2^30 bytes): the largest model "
                             "between --small and --large whose GGUF file (--quant) plus KV cache (--context) fits; "
                             "then `cbd export --quant` writes that file")
    p.add_argument("--alpha", default="auto",
                   help="weight of the smaller anchor: 'auto' (default: the best on the calibration's dev rows, "
                        "0 and 1 included), 'proportional' (by parameter count) or a number in [0, 1]")
    p.add_argument("--alpha-search", default="knots", choices=ALPHA_SEARCHES,
                   help="alpha auto: knots (default: interpolated between the anchor pair's grids at three sizes, "
                        "run once and cached) or exact (the grid at this size: seven dev passes)")
    p.add_argument("--mix", default="unit", choices=MIXES,
                   help="unit (default): alpha mixes the units both anchors have, the others keep their own anchor's "
                        "weights; paper: Eq. 3 over the expanded smaller and pruned larger anchor")
    p.add_argument("--init", default="cbd", choices=INITS)
    p.add_argument("--calibration",
                   help="instruction JSONL or text: its training rows rank units, its dev rows score alphas "
                        "(default: the anchors' calibration.json, else the package's own set)")
    p.add_argument("--importance", default="activation", choices=IMPORTANCES,
                   help="how pruning ranks units: activations on the calibration (default) or weight magnitude")
    p.add_argument("--prune-order", default=PRUNE_ORDER, choices=PRUNE_ORDERS,
                   help="one anchor cut to a --size: the FFN first (default), or every width axis by one fraction")
    p.add_argument("--refine-steps", type=int, default=REFINE_STEPS,
                   help="alpha auto: fit one alpha per module group in this many steps after the grid, kept only "
                        "if it beats the grid on the dev rows")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="then distill the model from --large for this many steps (default 0: teacher-free)")
    p.add_argument("--heal-data", help="instruction JSONL for healing (default: the package's calibration set)")
    p.add_argument("--heal-lr", type=float, help="healing learning rate (default: the distillation default)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grow", default="zero", choices=GROWS,
                   help="new layers: inert copies with zeroed residual writers (keeps the function) or replicas")
    p.add_argument("--quality", action="store_true",
                   help="also score the model and alpha 0 on the dev rows (two forward passes; alpha auto with "
                        "--alpha-search exact has them from its grid)")
    p.add_argument("--align", default="auto", choices=ALIGNMENTS,
                   help="how units of the two anchors are matched: recorded lineage, weight similarity, or position")
    p.add_argument("--quant", choices=GGUF_QUANTS, default=DEFAULT_QUANT["gguf"], help="--fits: the GGUF file counted")
    p.add_argument("--context", type=int, default=2048, help="--fits: tokens of KV cache counted (F16)")
    p.add_argument("--round-to-blocks", action="store_true",
                   help="--fits: hidden and FFN widths in whole 32-weight blocks (no tensor falls back to F16)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_materialize)

    p = subcommands.add_parser("inspect", help="print a model folder's family, shape and parameter count")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help='print {"family", "shape", "params"}')
    p.set_defaults(func=_inspect)

    p = subcommands.add_parser("import-gguf", help="convert a GGUF checkpoint to a safetensors folder")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_import_gguf)

    p = subcommands.add_parser("export", help="write a model folder as a GGUF file (llama.cpp, ollama, LM Studio) "
                                              "or an ONNX folder (ONNX Runtime GenAI; the Llama family)")
    p.add_argument("folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="gguf")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--quant", choices=GGUF_QUANTS + ONNX_PRECISIONS,
                       help="gguf: F16, Q8_0 (default), Q4_0; onnx: fp32 (default), int4 (its precision)")
    quant.add_argument("--precision", dest="quant", choices=ONNX_PRECISIONS, help="onnx: the same as --quant")
    p.add_argument("--out", required=True, help="the .gguf file, or the ONNX folder (absent or empty), to write")
    p.add_argument("--data", help="an instruction JSONL: also measure the export's validation loss in its runtime")
    p.set_defaults(func=_export)


def _materialize(args: argparse.Namespace) -> int:
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.spec.progress import TqdmProgress

    alpha = args.alpha if args.alpha in ("auto", "proportional") else float(args.alpha)
    if args.heal_steps and not args.large:
        raise ValueError("--heal-steps distills from --large: give it")
    shape, fits = json.loads(args.shape) if args.shape else None, None
    if args.fits:
        fits = _fit(args)
        shape = fits.pop("shape")
    out = Path(args.out)
    made = out.with_name(f".{out.name}.unhealed") if args.heal_steps else out
    progress = TqdmProgress()
    try:
        if not (made / "config.json").is_file():  # an interrupted heal resumes on the model it started from
            materialize(
                made, small=args.small, large=args.large, size=args.size, shape=shape, alpha=alpha, mix=args.mix,
                init=args.init, calibration=args.calibration, importance=args.importance,
                prune_order=args.prune_order, refine_steps=args.refine_steps, alpha_search=args.alpha_search,
                dtype=args.dtype, seed=args.seed, grow=args.grow, align=args.align, progress=progress,
                quality=args.quality,
            )
        record = json.loads((made / "cbd.json").read_text())
        summary = {"out": str(out), **{key: record.get(key) for key in ("params", "alpha", "shape", "quality")}}
        if fits:
            summary["fits"] = fits
        if args.heal_steps:
            summary["heal"] = _heal(made, args, progress)
    finally:
        progress.close()
    print(json.dumps(summary))
    return 0


def _fit(args: argparse.Namespace) -> dict:
    """The budget rule of POST /models with fits (cbd_engine/spec/fits.py) between --small and --large: the chosen
    shape and the arithmetic."""
    from cbd_engine.spec.export import gguf_tokenizer_bytes
    from cbd_engine.spec.families import ModelSpec, read_config
    from cbd_engine.spec.fits import Budget, arithmetic, fit_budget, parse_memory

    if not (args.small and args.large):
        raise ValueError("--fits chooses a shape between two anchors: give --small and --large")
    specs = sorted((ModelSpec.from_config(read_config(folder)) for folder in (args.small, args.large)),
                   key=lambda spec: -spec.num_params)
    budget = Budget(parse_memory(args.fits), "gguf", args.quant, args.context, args.round_to_blocks)
    tokenizer = Path(args.large) / "tokenizer.json"
    if not tokenizer.is_file():
        raise ValueError(f"{args.large} has no tokenizer.json, which a GGUF file carries")
    counted = gguf_tokenizer_bytes(json.loads(tokenizer.read_text()), specs[0].shape.vocab_size)
    fit = fit_budget(specs[0].architecture, [spec.shape for spec in specs], budget, counted)
    return {"shape": fit.chosen.shape.to_dict(), **arithmetic(fit, budget)}


def _heal(made: Path, args: argparse.Namespace, progress) -> dict:
    """Distill the materialized model from --large into --out; the unhealed folder goes once --out is written."""
    import shutil

    from cbd_engine.pipelines.heal import heal

    dataset = {"path": args.heal_data} if args.heal_data else None
    result = heal(made, args.large, args.out, args.heal_steps, dataset=dataset, learning_rate=args.heal_lr,
                  work_dir=made.with_name(made.name + "-work"), resume=True, progress=progress)
    shutil.rmtree(made, ignore_errors=True)
    shutil.rmtree(made.with_name(made.name + "-work"), ignore_errors=True)
    return {key: result.metrics[key] for key in ("validation_loss_before", "validation_loss", "steps")}


def _inspect(args: argparse.Namespace) -> int:
    from cbd_engine.spec.families import ModelSpec, read_config

    spec = ModelSpec.from_config(read_config(args.folder))
    info = {"family": spec.family.name, "shape": spec.shape.to_dict(), "params": spec.num_params}
    if args.json:
        print(json.dumps(info))
    else:
        s = spec.shape
        print(f"family  {info['family']} ({spec.config.get('model_type')})\nparams  {spec.num_params:,}\n"
              f"shape   {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads / {s.num_kv_heads} KV, "
              f"head_dim {s.head_dim}, FFN {s.intermediate_size}, vocab {s.vocab_size}, "
              f"positions {s.max_position_embeddings}, {'tied' if s.tie_word_embeddings else 'untied'} head",
              file=sys.stdout)
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from cbd_engine.io.gguf import import_gguf

    print(import_gguf(args.file, args.out))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cbd_engine.export.formats import FORMATS, export_files
    from cbd_engine.spec.export import DEFAULT_QUANT, check_quant

    quant = args.quant or DEFAULT_QUANT[args.format]
    check_quant(args.format, quant)
    export_format = FORMATS[args.format]
    path = export_format.write(Path(args.folder), Path(args.out), quant, None)
    summary = {"out": str(path), "format": args.format, "quant": quant,
               "size_bytes": sum(item.stat().st_size for _, item in export_files(path))}
    if args.data:
        summary["validation_loss"] = export_format.validation_loss(path, args.folder, args.data)
    print(json.dumps(summary))
    return 0
