"""`cbd materialize`, `cbd inspect`, `cbd import-gguf`: the materializer's command-line face."""

from __future__ import annotations

import argparse
import json
import sys


def register(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser("materialize", help="build a model of any size from one or two anchors")
    p.add_argument("--small", help="the smaller anchor (a Hugging Face folder)")
    p.add_argument("--large", help="the larger anchor (a Hugging Face folder)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--size", help="total parameters: 100000000, 100M, 1.2B")
    target.add_argument("--shape", help='JSON: {"num_layers", "hidden_size", "num_heads", "num_kv_heads", '
                                        '"head_dim", "intermediate_size"}')
    p.add_argument("--alpha", help="weight of the smaller anchor in [0, 1], or 'auto' (default: by size)")
    p.add_argument("--init", default="cbd", choices=("cbd", "random", "single", "learngene_auto", "learngene_van"))
    p.add_argument("--calibration", help="instruction JSONL or text for activation importance and alpha 'auto'")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grow", default="zero", choices=("zero", "replicate"),
                   help="new layers: inert copies with zeroed residual writers (keeps the function) or replicas")
    p.add_argument("--align", default="auto", choices=("auto", "lineage", "hungarian", "none"),
                   help="how units of the two anchors are matched: recorded lineage, weight similarity, or position")
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


def _materialize(args: argparse.Namespace) -> int:
    from cbd_engine.materialize import materialize
    from cbd_engine.progress import TqdmProgress

    alpha = args.alpha if args.alpha in (None, "auto") else float(args.alpha)
    progress = TqdmProgress()
    try:
        result = materialize(
            args.out, small=args.small, large=args.large, size=args.size,
            shape=json.loads(args.shape) if args.shape else None, alpha=alpha, init=args.init,
            calibration=args.calibration, dtype=args.dtype, seed=args.seed, grow=args.grow, align=args.align,
            progress=progress,
        )
    finally:
        progress.close()
    summary = {"out": str(result.out), "params": result.params, "alpha": result.alpha,
               "shape": result.shape.to_dict()}
    print(json.dumps(summary))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cbd_engine.checkpoint import read_config
    from cbd_engine.families import ModelSpec

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
    from cbd_engine.gguf_import import import_gguf

    print(import_gguf(args.file, args.out))
    return 0
