"""The README's "300 MB on a CPU box" run through the service, and llama.cpp's own memory at that context
(docs/SERVICE.md, "Fit a memory budget").

    .venv/bin/python bench/fits.py [--memory 300MB] [--quant Q8_0] [--context 8192] [--init cbd] [--out DIR]

The chain is the demo's shapes: SmolLM2-135M-Instruct and a 90M anchor of the shape the demo cuts (by weight
magnitude here, and registered as it is, not distilled: bytes depend on the shapes and the tokenizer only, so they
are the demo chain's; `--init random` skips the model's forward passes for the same reason, on a busy machine).
`cbd serve` (embedded worker) gets the README's POST /models with `fits`; the bench waits for
the model and its export, downloads the GGUF file through the sibling repository, and loads it in llama.cpp (the
xllamacpp wheel, in a child process) with the budget's context, where it answers one chat message. Prints one JSON
line: the arithmetic, the file's size, and the buffers llama.cpp reports (model, KV cache, compute, output).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service import start_service, wait_for

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the child: llama.cpp (the xllamacpp wheel) loads the file with the budget's context and answers one message; its
# log says what it holds, per buffer
LOAD = """
import sys, xllamacpp
params = xllamacpp.CommonParams()
params.model.path, params.n_ctx, params.n_parallel, params.verbosity = sys.argv[1], int(sys.argv[2]), 1, 10
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
server = xllamacpp.Server(params)
reply = server.handle_chat_completions({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
print("answered" if "choices" in reply else reply)
"""
BUFFER = re.compile(r"(model|KV|compute|output) buffer size =\s+([0-9.]+) MiB")


def llama_cpp_buffers(path: Path, context: int) -> dict[str, float]:
    """MiB per kind of buffer llama.cpp allocates for the file at this context (the last load it logs)."""
    done = subprocess.run([sys.executable, "-c", LOAD, str(path), str(context)], capture_output=True, text=True,
                          errors="replace", check=True)  # the debug log prints token bytes
    assert done.stdout.strip().endswith("answered"), done.stdout
    buffers: dict[str, float] = {}
    for line in done.stderr.splitlines():  # a first pass projects memory use with empty buffers; the load follows
        for kind, mib in BUFFER.findall(line):
            buffers[kind] = float(mib)
    return buffers


def demo_anchor(source: Path, out: Path) -> Path:
    """A 90M anchor of the demo anchor's shape (the same size rule), cut from the source by weight magnitude."""
    if not (out / "config.json").is_file():
        from cbd_engine.materialization.recipe import materialize

        materialize(out, large=source, size="90M", importance="magnitude", dtype="float32")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", default="300MB")
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--init", default="cbd", help="the model's init (its bytes do not depend on it)")
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
            answer = client.post("/models", json={"source": SOURCE, "fits": fits, "init": args.init})
            answer.raise_for_status()
            model = answer.json()
            export = wait_for(client, f"/models/{model['id']}/exports/{model['fits']['export']['id']}",
                              ("ready", "failed", "cancelled"), interval=1.0)
            seconds = time.monotonic() - started
            repo = export["hub_repo_id"]
            path = args.out / f"{model['id']}-{args.quant}.gguf"
            path.write_bytes(client.get(f"/{repo}/resolve/main/model-{args.quant}.gguf").content)
        buffers = llama_cpp_buffers(path, args.context)
        arithmetic = {k: v for k, v in model["fits"].items() if k != "export"}
        print(json.dumps({"model": model["id"], "shape": model["shape"], "fits": arithmetic,
                          "export_status": export["status"], "file_bytes_written": path.stat().st_size,
                          "file_plus_kv": path.stat().st_size + arithmetic["kv_cache_bytes"],
                          "seconds_to_export": round(seconds, 1), "llama_cpp_mib": buffers,
                          "llama_cpp_bytes": round(sum(buffers.values()) * 2**20)}))
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
