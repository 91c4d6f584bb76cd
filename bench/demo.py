"""The README's demo as a new user meets it, timed, and the quality of the models it serves (docs/RESULTS.md,
"The demo").

    .venv/bin/python bench/demo.py [--sizes 100M,110M] [--out /tmp/cbd-demo] [--fresh-cache]

Starts `cbd serve --demo` on a fresh data folder (with --fresh-cache also a fresh CBD_CACHE_DIR, so SmolLM2 is fetched
and converted too), notes when the port answers and when the demo chain is ready (its job's stages and estimates
along the way), requests each size with the README's POST /models (defaults: alpha auto, unit mix), downloads the
files through the API, and scores the downloaded models and the source on held-out Dolly (the validation rows of
../shared/data/instruction/minillm_dolly_dev.jsonl, which the demo never reads) and on minillm_uinst_valid.jsonl's,
with greedy answers to the service's sample prompts in the chat template and the alpaca prompt. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from quality import HELD_OUT, mean, row_losses
from service import free_port

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def serve_demo(data: Path, cache: Path | None) -> tuple[subprocess.Popen, str, float]:
    """`cbd serve --demo` as the README runs it; (process, url, seconds until the port answered)."""
    port = free_port()
    env = {**os.environ, "CBD_DATA_DIR": str(data), "CBD_PORT": str(port), "CBD_RATE_LIMIT_PER_MINUTE": "0"}
    if cache is not None:
        env["CBD_CACHE_DIR"] = str(cache)
    log = open(data.parent / "serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "cbd_cli", "serve", "--demo"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(f"{url}/healthz")
            return process, url, time.monotonic() - started
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError(f"cbd serve exited {process.returncode}; see {data.parent / 'serve.log'}") from None
            time.sleep(0.2)


def wait_for_chain(client: httpx.Client, started: float) -> list[dict]:
    """Poll the demo chain's job until it ends; one record per stage seen (first time, estimate)."""
    seen: list[dict] = []
    while True:
        chain = client.get("/chains").json()["items"][0]
        job = client.get(chain["job"]["url"]).json()
        progress = job["progress"]
        if not seen or seen[-1]["stage"] != progress.get("stage"):
            seen.append({"stage": progress.get("stage"), "at": round(time.monotonic() - started, 1),
                         "eta_seconds": progress.get("eta_seconds"), "estimated_seconds": progress.get(
                             "estimated_seconds")})
            print(json.dumps({"demo_stage": seen[-1]}), flush=True)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"the demo chain's job {job['status']}: {job['error']}")
            return seen
        time.sleep(2)


def request_model(client: httpx.Client, size: str, folder: Path) -> dict:
    """The README's POST /models, waited for, its files downloaded into `folder`."""
    created = client.post("/models", json={"source": SOURCE, "size": size, "dtype": "float32"})
    created.raise_for_status()
    model_id = created.json()["id"]
    started = time.monotonic()
    while (model := client.get(f"/models/{model_id}").json())["status"] not in ("ready", "failed"):
        time.sleep(1)
    job = client.get(model["job"]["url"]).json()
    while job["status"] in ("queued", "running"):  # metrics (samples) land after the files
        time.sleep(1)
        job = client.get(model["job"]["url"]).json()
    model = client.get(f"/models/{model_id}").json()
    folder.mkdir(parents=True, exist_ok=True)
    for file in model["files"]:
        (folder / file["name"]).write_bytes(client.get(file["url"]).content)
    return {"id": model_id, "seconds": round(time.monotonic() - started, 1), "params": model["params"],
            "alpha": model["alpha"], "metrics": model["metrics"], "warnings": job["result"].get("warnings")}


def answers(folder: Path) -> dict:
    from cbd_engine.evaluation.samples import sample_answers

    return {fmt: sample_answers(folder, prompt_format=fmt) for fmt in ("chat", "alpaca")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100M,110M")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cbd-demo"))
    parser.add_argument("--fresh-cache", action="store_true", help="fetch and convert SmolLM2 too")
    args = parser.parse_args()
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=False)
    started = time.monotonic()
    process, url, listening = serve_demo(data, args.out / "cache" if args.fresh_cache else None)
    print(json.dumps({"port_answered_after_seconds": round(listening, 1)}), flush=True)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            stages = wait_for_chain(client, started)
            print(json.dumps({"chain_ready_after_seconds": round(time.monotonic() - started, 1), "stages": stages}),
                  flush=True)
            served = {size: request_model(client, size, args.out / f"model-{size}") for size in args.sizes.split(",")}
    finally:
        process.terminate()
        process.wait(timeout=60)
    from cbd_engine.evaluation.stats import paired_difference
    from cbd_engine.io.zoo import smollm2_135m_instruct

    source = smollm2_135m_instruct()
    reference = row_losses(source)
    print(json.dumps({"model": "source", **{k: mean(v) for k, v in reference.items()}, "answers": answers(source)}),
          flush=True)
    for size, record in served.items():
        folder = args.out / f"model-{size}"
        losses = row_losses(folder)
        gaps = {f"{k} - source": paired_difference(losses[k], reference[k]) for k in HELD_OUT}
        print(json.dumps({"model": size, **record, **{k: mean(v) for k, v in losses.items()}, **gaps,
                          "answers": answers(folder)}), flush=True)


if __name__ == "__main__":
    main()
