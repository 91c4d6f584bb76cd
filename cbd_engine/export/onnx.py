"""A model folder -> an ONNX Runtime GenAI folder (model.onnx, its external data model.onnx.data,
genai_config.json, the tokenizer files with the chat template): onnxruntime-genai's own model builder
(`onnxruntime_genai.models.builder`), for the Llama family (Llama with GQA, Mistral, Qwen2, Qwen3 with its q/k
norms), CPU execution provider.

Why the builder and not an exporter of our own or optimum: the builder writes the graph onnxruntime-genai runs
(fused GroupQueryAttention with rotary caches, SkipSimplifiedLayerNorm, a KV cache laid out as its generator
expects) and its genai_config.json; optimum's ONNX exporter pins transformers below 5. The builder chooses its
exporter by config.json's `architectures[0]`, so this module only decides, from the model type (the same table as
the service's 422: cbd_engine.spec.export), which architecture the model is, and hands the builder a folder whose
config says so (CBD folders carry their source's config, which may lack `architectures`).

Precisions (the builder's defaults for the CPU provider): fp32 keeps every weight as float32 (a bfloat16 model is
widened exactly); int4 quantizes every MatMul weight (the attention and MLP projections and the output head) to
MatMulNBits, symmetric 4-bit in blocks of 32 along the input with one float scale a block, with 8-bit activations
in the products (accuracy_level 4); norms stay float32, and so does an untied token embedding (a tied one is the
head's 4-bit copy, read by GatherBlockQuantized).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

from cbd_engine.io.atomic import atomic_output_dir
from cbd_engine.spec.export import ONNX_ARCHITECTURES, ONNX_PRECISIONS, check_family
from cbd_engine.spec.families import read_config

EXECUTION_PROVIDER = "cpu"


class ONNXExportError(ValueError):
    """A model or precision this exporter cannot write (the message says what and why)."""


def _stage(folder: Path, config: dict, stage: Path) -> Path:
    """`stage`: the model folder's files as links, with a config.json that names the builder's architecture."""
    stage.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    architecture = ONNX_ARCHITECTURES[config["model_type"]]
    (stage / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}, indent=2))
    return stage


def write_onnx(folder: str | Path, out: str | Path, precision: str = "fp32") -> Path:
    """Write the model folder `folder` as an ONNX Runtime GenAI folder at `out` (absent or empty; made
    atomically), its weights in `precision` (fp32 or int4)."""
    if precision not in ONNX_PRECISIONS:
        raise ONNXExportError(f"precision must be one of {', '.join(ONNX_PRECISIONS)}, got {precision!r}")
    folder, out = Path(folder), Path(out)
    config = read_config(folder)
    try:
        check_family("onnx", config.get("model_type"))
    except ValueError as error:
        raise ONNXExportError(str(error)) from None
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with atomic_output_dir(out) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".onnx-build-") as work:
        stage, cache = str(_stage(folder, config, Path(work) / "model")), str(Path(work) / "cache")
        with contextlib.redirect_stdout(sys.stderr):  # the builder narrates on stdout; the CLI prints its JSON there
            options = parse_extra_options(None, stage, str(tmp), precision, EXECUTION_PROVIDER, cache, [])
            create_model(None, stage, str(tmp), precision, EXECUTION_PROVIDER, cache, **options)
    return out
