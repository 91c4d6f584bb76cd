"""The console's pages on a registry of 1,000 models (results and command in docs/SERVICE_BENCHMARKS.md).

    .venv/bin/python bench/console.py [--models 1000] [--requests 50]

Fills a fresh SQLite registry directly (one SmolLM2-135M-shaped chain of three anchors, N ready models spread over
its range with the metrics, provenance summary, six files and a succeeded job each, as the worker leaves them), then
times each page and fragment the console loads, over HTTP on loopback from the app served by uvicorn (one process,
auth off), sequential requests after a warm-up: median, 95th percentile and maximum. Target: every one within 100 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.db import upgrade_database  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import Anchor, Artifact, Chain, Job, Model  # noqa: E402
from app.settings import Settings  # noqa: E402

CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
          "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
FIXED = {"head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True}
ANCHORS = [  # (params, layers, intermediate): SmolLM2-135M and two anchors cut from it
    (134_515_008, 30, 1536), (88_066_368, 30, 640), (68_114_496, 20, 640)]
FILES = ["cbd.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]


def shape(layers: int, intermediate: int) -> dict:
    return {"num_layers": layers, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
            "intermediate_size": intermediate, **FIXED}


def loss(params: int) -> float:
    """A made-up validation loss falling with size, for the chart to have a curve."""
    return 1.6 + 0.6 * (1 - params / ANCHORS[0][0])


def fill(settings: Settings, count: int) -> tuple[str, str, str]:
    """The registry: returns the chain's, one model's and one job's id."""
    rng = random.Random(0)
    app = create_app(settings)
    with app.state.session_factory() as session:
        chain = Chain(name="smollm2", source="HuggingFaceTB/SmolLM2-135M-Instruct", family="llama", status="ready",
                      spec={"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "anchors": [{"size": "90M"},
                                                                                         {"size": "68M"}]})
        session.add(chain)
        session.flush()
        anchors = []
        for index, (params, layers, intermediate) in enumerate(ANCHORS):
            config = {**CONFIG, "num_hidden_layers": layers, "intermediate_size": intermediate}
            anchor = Anchor(chain_id=chain.id, index=index, params=params, shape=shape(layers, intermediate),
                            config=config, status="ready", metrics={"validation_loss": loss(params)})
            session.add(anchor)
            anchors.append(anchor)
        session.flush()
        start = datetime.now(timezone.utc) - timedelta(days=30)
        for i in range(count):
            large, small = (anchors[0], anchors[1]) if i % 2 else (anchors[1], anchors[2])
            params = rng.randint(small.params, large.params)
            metrics = {"validation_loss": loss(params) + rng.random() * 0.04,
                       "anchors_validation_loss": {small.id: small.metrics["validation_loss"],
                                                   large.id: large.metrics["validation_loss"]},
                       "dev_loss": 1.7, "alpha_0_dev_loss": 1.75, "alphas": {"attention": 0.5, "mlp": 0.4},
                       "flags": {"worse_than_alpha_0": False, "worse_than_uniform": False},
                       "samples": [{"prompt": f"instruction {k} " * 8, "answer": "an answer " * 30}
                                   for k in range(3)]}
            model = Model(identity=hashlib.sha256(str(i).encode()).hexdigest(), chain_id=chain.id,
                          source=chain.source, size=params, params=params, shape=large.shape, alpha=0.5,
                          alpha_request="auto", mix="unit", heal=None, init="cbd", seed=i, dtype="bfloat16",
                          engine_version="0.2.0", small_anchor_id=small.id, large_anchor_id=large.id,
                          status="ready", metrics=metrics, owner="anonymous",
                          provenance={"params": params, "alpha_search": [[a / 6, 1.7] for a in range(7)],
                                      "note": "x" * 1500}, created_at=start + timedelta(minutes=i))
            session.add(model)
            session.flush()
            for name in FILES:
                session.add(Artifact(owner_id=model.id, name=name, size=1000,
                                     sha256=hashlib.sha256(f"{i}/{name}".encode()).hexdigest()))
            job = Job(kind="materialize_model", subject_id=model.id, status="succeeded", queue="cpu",
                      progress={"stage": "samples", "step": 3, "total": 3, "fraction": 1.0},
                      attempts=1, created_at=model.created_at, started_at=model.created_at,
                      finished_at=model.created_at + timedelta(seconds=20))
            session.add(job)
        session.commit()
        return chain.id, model.id, session.query(Job.id).order_by(Job.id.desc()).first()[0]


def serve(settings: Settings) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cbd-console-bench-"))
    settings = Settings(data_dir=folder, auth="off", rate_limit_per_minute=0)
    upgrade_database(settings.resolved_database_url)
    chain_id, model_id, job_id = fill(settings, args.models)
    server, url = serve(settings)
    plan = {"chain": chain_id, "size": "110M"}
    pages = [("GET", "/ui", None), ("GET", "/ui/fragments/chains", None),
             ("GET", f"/ui/fragments/chains/{chain_id}", None), ("GET", "/ui/fragments/jobs", None),
             ("GET", f"/ui/fragments/jobs/{job_id}", None), ("GET", f"/ui/fragments/models/{model_id}", None),
             ("POST", "/models/plan", plan)]
    print(f"{args.models} models, {args.requests} sequential requests each after 3 warm-up ones\n")
    print("| request | bytes | median | p95 | max |\n|---|---|---|---|---|")
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, body in pages:
            for _ in range(3):
                client.request(method, path, json=body).raise_for_status()
            times = []
            for _ in range(args.requests):
                started = time.perf_counter()
                response = client.request(method, path, json=body)
                times.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            times.sort()
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            shown = path.replace(chain_id, "{chain}").replace(model_id, "{model}").replace(job_id, "{job}")
            print(f"| {method} {shown} | {len(response.content):,} | {statistics.median(times):.1f} ms | {p95:.1f} ms "
                  f"| {times[-1]:.1f} ms |")
    server.should_exit = True


if __name__ == "__main__":
    main()
