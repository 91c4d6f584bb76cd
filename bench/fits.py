"""The README's "300 MB on a CPU box" run through the service, and llama.cpp's own memory at that context
(docs/SERVICE.md, "Fit a memory budget").

    .venv/bin/python bench/fits.py [--memory 300MB] [--quant Q8_0] [--context 8192] [--out /tmp/cbd-fits]

The chain is the demo's shapes: SmolLM2-135M-Instruct and a 90M anchor cut from it by activations as the demo
cuts its anchor (registered as it is, not distilled: the bytes depend on the shapes and the tokenizer only, so they
are the demo chain's). `cbd serve` (embedded worker) gets the README's POST /models with `fits`; the bench waits for
the model and its export, downloads the GGUF file through the sibling repository, and loads it in llama.cpp (the
xllamacpp wheel, in a child process) with the budget's context, where it answers one chat message. Prints one JSON
line: the arithmetic, the file's size, and the child's peak resident memory before and after loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service import start_service, wait_for

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the child: peak resident memory with Python and the wheel loaded, then after llama.cpp holds the file and its
# context and has answered (ru_maxrss: KiB on Linux)
LOAD = """
import json, resource, sys
from cbd_engine.export.llamacpp import LlamaCpp
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
runtime = LlamaCpp(sys.argv[1], context=int(sys.argv[2]))
answer = runtime.chat("What is the capital of France?", 32)
print(json.dumps({"rss_before": before, "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "answer": answer}))
"""


def demo_anchor(source: Path, out: Path) -> Path:
    """The demo's 90M anchor shape, cut from the source by activations on the package's calibration set."""
    if not (out / "config.json").is_file():
        from cbd_engine.materialization.recipe import materialize

        materialize(out, large=source, size="90M", dtype="float32")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", default="300MB")
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-fits"))
    args = parser.parse_args()
    from cbd_engine.io.cache import cache_dir
    from cbd_engine.io.zoo import smollm2_135m_instruct

    args.out.mkdir(parents=True, exist_ok=True)
    anchor = demo_anchor(smollm2_135m_instruct(), args.out / "anchor-90M")
    process, url = start_service(args.out / "data", [args.out, cache_dir()])
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            chain = client.post("/chains", json={"name": "demo-shapes", "source": SOURCE, "device": "cpu",
                                                 "anchors": [{"checkpoint": str(anchor), "distill": False}]}).json()
            wait_for(client, f"/chains/{chain['id']}", ("ready", "failed"), interval=1.0)
            started = time.monotonic()
            fits = {"memory": args.memory, "format": "gguf", "quant": args.quant, "context": args.context}
            answer = client.post("/models", json={"source": SOURCE, "fits": fits})
            answer.raise_for_status()
            model = answer.json()
            export = wait_for(client, f"/models/{model['id']}/exports/{model['fits']['export']['id']}",
                              ("ready", "failed", "cancelled"), interval=1.0)
            seconds = time.monotonic() - started
            repo = export["hub_repo_id"]
            path = args.out / f"{model['id']}-{args.quant}.gguf"
            path.write_bytes(client.get(f"/{repo}/resolve/main/model-{args.quant}.gguf").content)
        loaded = subprocess.run([sys.executable, "-c", LOAD, str(path), str(args.context)], capture_output=True,
                                text=True, check=True)
        measured = json.loads(loaded.stdout.strip().splitlines()[-1])
        arithmetic = {k: v for k, v in model["fits"].items() if k != "export"}
        print(json.dumps({"model": model["id"], "shape": model["shape"], "fits": arithmetic,
                          "export_status": export["status"], "file_bytes_written": path.stat().st_size,
                          "file_plus_kv": path.stat().st_size + arithmetic["kv_cache_bytes"],
                          "seconds_to_export": round(seconds, 1), **measured,
                          "llama_cpp_bytes": measured["rss_peak"] - measured["rss_before"]}))
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
