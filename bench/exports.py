"""What an export costs in quality and bytes (docs/SERVICE.md, "Exports"): a model folder (default: the cached
SmolLM2-135M-Instruct) written in each format and quantization, its validation loss measured in its own runtime
(llama.cpp for GGUF, onnxruntime-genai for ONNX) on Dolly's validation rows, against the model's own loss in
transformers on the same rows, with the export's size and its greedy answer to one question.

    .venv/bin/python bench/exports.py [--model FOLDER] [--exports onnx:fp32,onnx:int4,gguf:Q8_0] [--rows 50]

Prints one JSON line per export. Needs ../shared (the repository's data).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "instruction" / "minillm_dolly_dev.jsonl"
QUESTION = "What is the capital of France?"


def main() -> None:
    from cbd_engine.export.formats import FORMATS, export_files
    from cbd_engine.io.zoo import smollm2_135m_instruct
    from cbd_engine.nn.validation import validation_loss
    from cbd_engine.spec.export import export_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="a model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--exports", default="onnx:fp32,onnx:int4,gguf:F16,gguf:Q8_0,gguf:Q4_0")
    parser.add_argument("--rows", type=int, default=50)
    args = parser.parse_args()
    model = args.model or smollm2_135m_instruct()
    started = time.monotonic()
    print(json.dumps({"export": "transformers", "validation_loss": validation_loss(model, DOLLY, max_rows=args.rows),
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)
    with tempfile.TemporaryDirectory() as work:
        for item in args.exports.split(","):
            fmt, quant = item.split(":")
            started = time.monotonic()
            export_format = FORMATS[fmt]
            path = export_format.write(model, Path(work) / export_path(fmt, quant), quant, None)
            loss = export_format.validation_loss(path, model, DOLLY, max_rows=args.rows)
            with export_format.runtime(path) as runtime:
                answer = runtime.chat(QUESTION, 24)
            print(json.dumps({"export": item, "validation_loss": loss,
                              "size_bytes": sum(f.stat().st_size for _, f in export_files(path)), "answer": answer,
                              "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
