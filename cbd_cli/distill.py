"""`cbd chain build SPEC --out DIR [--resume]` and `cbd distill --teacher DIR --student DIR --data FILE --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subcommands: argparse._SubParsersAction) -> None:
    chain = subcommands.add_parser("chain", help="knowledge chains")
    chain_commands = chain.add_subparsers(dest="chain_command", required=True, metavar="SUBCOMMAND")
    build = chain_commands.add_parser("build", help="build a chain from a POST /chains body (JSON or YAML)")
    build.add_argument("spec", type=Path, help="SPEC.json or SPEC.yaml: the POST /chains request body")
    build.add_argument("--out", type=Path, required=True, help="folder for the anchors")
    build.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    build.add_argument("--estimate", action="store_true", help="print the parsed plan and time estimate, then stop")
    build.set_defaults(func=run_chain_build)

    distill = subcommands.add_parser("distill", help="distill one student from one teacher")
    distill.add_argument("--teacher", type=Path, required=True, help="teacher model folder")
    distill.add_argument("--student", type=Path, required=True, help="student model folder (its starting point)")
    distill.add_argument("--data", type=Path, required=True, help="instruction JSONL or plain text file")
    distill.add_argument("--out", type=Path, required=True, help="folder for the distilled student")
    distill.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --out")
    add_config_options(distill)
    distill.set_defaults(func=run_distill)


def add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--config FILE plus one flag per DistillConfig setting (numbers, strings, and --x/--no-x for switches), except
    `skip`."""
    parser.add_argument("--config", type=Path, help="JSON or YAML file of settings (flags override it)")
    for name, kind, default, help_text in _OPTIONS:
        if name in skip:
            continue
        flag, text = f"--{name.replace('_', '-')}", f"{help_text} (default {default})"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=text)


def _options() -> list[tuple[str, type, object, str]]:
    from dataclasses import fields

    from cbd_engine.spec.distill_config import DistillConfig

    helps = {"loss": "forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or ce",
             "mode": "off_policy, on_policy or minillm", "device": "auto, cpu, gpu or npu",
             "bf16": "bf16 autocast; unset: on accelerators only",
             "gradient_checkpointing": "activation checkpointing of the student; unset: on accelerators only",
             "fsdp": "shard the student with FSDP2 under torchrun", "compile": "torch.compile the decoder stacks"}
    result = []
    for item in fields(DistillConfig):
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(item.type).split(" ")[0])
        if kind is not None:
            result.append((item.name, kind, item.default, helps.get(item.name, item.name.replace("_", " "))))
    return result


_OPTIONS = _options()


def read_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def config_from_args(args: argparse.Namespace):  # -> DistillConfig (imported late: the CLI starts fast)
    from cbd_engine.spec.distill_config import DistillConfig

    settings = read_spec(args.config) if args.config else {}
    settings.update({name: getattr(args, name) for name, *_ in _OPTIONS if getattr(args, name, None) is not None})
    return DistillConfig.from_dict(settings)


def run_chain_build(args: argparse.Namespace) -> int:
    from cbd_engine.pipelines.chain import build_chain
    from cbd_engine.spec.estimate import spec_summary
    from cbd_engine.spec.progress import TqdmProgress

    spec = read_spec(args.spec)
    if args.estimate:
        print(json.dumps(spec_summary(spec), indent=1, default=str))
        return 0
    bar = TqdmProgress()
    try:
        result = build_chain(spec, args.out, resume=args.resume, progress=bar)
    finally:
        bar.close()
    for anchor in result.anchors:
        print(f"anchor {anchor.index}: {anchor.params / 1e6:.1f}M  {anchor.path}  "
              f"{json.dumps({k: v for k, v in anchor.metrics.items() if 'loss' in k})}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from cbd_engine.data.batches import encode_file
    from cbd_engine.distillation.recipe import distill
    from cbd_engine.nn.loading import load_tokenizer
    from cbd_engine.spec.progress import TqdmProgress

    config = config_from_args(args)
    data = encode_file(load_tokenizer(args.student), args.data, config.prompt_format, config.max_length)
    bar = TqdmProgress()
    try:
        result = distill(args.teacher, args.student, data, args.out, config, resume=args.resume, progress=bar)
    finally:
        bar.close()
    print(json.dumps(result.metrics, indent=1))
    return 0
