"""Service benchmarks on loopback (results and commands in docs/SERVICE_BENCHMARKS.md).

1. POST /models to downloadable files for a ~110M model on CPU, against the engine's own materialization time.
2. Download of SmolLM2-135M's 538 MB model.safetensors (anchor 0) against reading the same file from disk.
3. Cached POST /models and GET /models/{id} from 32 connections at 200 requests/s: latency percentiles.

    .venv/bin/python bench/service.py --anchor /path/to/smollm2-90M [--seconds 20] [--rates 200,400] [--out FILE]

The anchor is any 90M folder derived from SmolLM2-135M-Instruct (`cbd materialize --large <smollm2> --size 90M
--dtype float32 --out ...`). The service runs as `cbd serve` (embedded worker, SQLite, local artifacts).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(data: Path, roots: list[Path]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "CBD_DATA_DIR": str(data), "CBD_PORT": str(port), "CBD_RATE_LIMIT_PER_MINUTE": "0",
           "CBD_ALLOWED_SOURCE_ROOTS": ":".join(map(str, roots)), "CBD_EMBEDDED_POLL_SECONDS": "0.1"}
    log = open(data.parent / "serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen([sys.executable, "-m", "cbd_cli", "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/healthz")
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("cbd serve did not start")


def wait_for(client: httpx.Client, path: str, finished: tuple[str, ...], interval: float = 0.02) -> dict:
    """GET `path` until its status is one of `finished`; the last body."""
    while True:
        body = client.get(path).json()
        if body["status"] in finished:
            return body
        time.sleep(interval)


def wait_job(client: httpx.Client, job_id: str, interval: float = 0.02) -> dict:
    return wait_for(client, f"/jobs/{job_id}", ("succeeded", "failed", "cancelled"), interval)


def wait_ready(client: httpx.Client, model_id: str, interval: float = 0.02) -> dict:
    return wait_for(client, f"/models/{model_id}", ("ready", "failed", "cancelled"), interval)


def bench_materialize(client: httpx.Client) -> dict:
    started = time.monotonic()
    created = client.post("/models", json={"source": SOURCE, "size": "110M", "dtype": "float32"})
    assert created.status_code == 202, created.text
    model = wait_ready(client, created.json()["id"])
    weights = next(f for f in model["files"] if f["name"] == "model.safetensors")
    assert client.head(weights["url"]).status_code == 200
    total = time.monotonic() - started
    wait_job(client, model["job"]["id"], 0.2)  # the worker goes on to measure validation loss; let it finish
    engine = model["provenance"]["service"]["materialize_seconds"]
    return {"params": model["params"], "post_to_downloadable_s": round(total, 3), "materialize_s": engine,
            "overhead_s": round(total - engine, 3), "publish_s": model["provenance"]["service"]["publish_seconds"]}


def bench_download(client: httpx.Client, chain: dict, source_file: Path) -> dict:
    weights = next(f for f in chain["anchors"][0]["files"] if f["name"] == "model.safetensors")
    def disk_read() -> float:
        started = time.monotonic()
        with open(source_file, "rb") as handle:
            while handle.read(8 << 20):
                pass
        return time.monotonic() - started

    disk_read()  # warm the page cache for both
    disk = min(disk_read() for _ in range(3))
    direct = subprocess.run(["dd", f"if={source_file}", "of=/dev/null", "bs=8M", "iflag=direct"], capture_output=True,
                            text=True)
    direct_seconds = float(direct.stderr.strip().splitlines()[-1].split(" s,")[0].split(", ")[-1])
    curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}",
                           f"{client.base_url}{weights['url']}"], capture_output=True, text=True, check=True)
    curl_seconds = float(curl.stdout)
    times = []
    for _ in range(3):
        digest = hashlib.sha256() if not times else None
        started = time.monotonic()
        with client.stream("GET", weights["url"]) as response:
            for chunk in response.iter_raw(8 << 20):
                if digest is not None:
                    digest.update(chunk)
        times.append(time.monotonic() - started)
        if digest is not None:
            assert digest.hexdigest() == weights["sha256"]
    best = min(times[1:])  # the first pass also hashes
    size = weights["size"]
    return {"bytes": size, "download_httpx_MBps": round(size / best / 1e6, 1),
            "download_curl_MBps": round(size / curl_seconds / 1e6, 1),
            "page_cache_read_MBps": round(size / disk / 1e6, 1),
            "disk_read_o_direct_MBps": round(size / direct_seconds / 1e6, 1),
            "curl_time_over_o_direct_time": round(curl_seconds / direct_seconds, 2)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_latency(url: str, chain_id: str, model: dict, seconds: float, api_pid: int, rate: float = 200,
                        connections: int = 32) -> dict:
    body = {"chain": chain_id, "size": model["size"], "dtype": model["dtype"]}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    latencies: dict[str, list[float]] = {"post": [], "get": []}
    statuses: dict[int | str, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def one(i: int) -> None:
            kind = "post" if i % 2 else "get"
            started = time.perf_counter()
            if kind == "post":
                response = await client.post("/models", json=body)
            else:
                response = await client.get(f"/models/{model['id']}")
            latencies[kind].append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async def guarded(i: int) -> None:
            try:
                await one(i)
            except httpx.HTTPError as error:
                statuses[type(error).__name__] = statuses.get(type(error).__name__, 0) + 1

        tasks, start, i, cpu_start = [], time.perf_counter(), 0, cpu_seconds(api_pid)
        while time.perf_counter() - start < seconds:  # open loop: requests leave on schedule, not on answers
            tasks.append(asyncio.create_task(guarded(i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        api_cpu = cpu_seconds(api_pid) - cpu_start

    def pct(values: list[float], q: float) -> float:
        return round(statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1000, 2)

    everything = latencies["post"] + latencies["get"]
    return {"requests": len(everything), "achieved_rps": round(len(everything) / elapsed, 1), "statuses": statuses,
            "p50_ms": pct(everything, 0.5), "p99_ms": pct(everything, 0.99),
            "post_p99_ms": pct(latencies["post"], 0.99), "get_p99_ms": pct(latencies["get"], 0.99),
            "api_cpu_ms_per_request": round(api_cpu / max(1, len(everything)) * 1000, 2),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor", type=Path, required=True, help="a 90M folder derived from SmolLM2-135M")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rates", default="200", help="comma-separated request rates for the latency test; the "
                        "highest whose p99 stays under 50 ms is reported")
    args = parser.parse_args()
    from cbd_engine.io.zoo import smollm2_135m_instruct

    smollm2 = smollm2_135m_instruct()
    work = Path(tempfile.mkdtemp(prefix="cbd-bench-"))
    process, url = start_service(work / "data", [args.anchor.resolve().parent])
    results: dict = {"cpu_count": os.cpu_count()}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            started = time.monotonic()
            chain = client.post("/chains", json={"name": "bench", "source": SOURCE, "device": "cpu", "anchors": [
                {"checkpoint": str(args.anchor.resolve()), "distill": False}]}).json()
            assert wait_job(client, chain["job"]["id"], 0.2)["status"] == "succeeded"
            results["register_chain_s"] = round(time.monotonic() - started, 1)
            chain = client.get(f"/chains/{chain['id']}").json()
            results["materialize"] = bench_materialize(client)
            print(json.dumps(results["materialize"]), flush=True)
            results["download"] = bench_download(client, chain, smollm2 / "model.safetensors")
            print(json.dumps(results["download"]), flush=True)
            model = client.get("/models", params={"status": "ready"}).json()["items"][0]
        results["latency"] = []
        for rate in (float(r) for r in args.rates.split(",")):
            latency = asyncio.run(bench_latency(url, chain["id"], model, args.seconds, process.pid, rate=rate))
            results["latency"].append({"offered_rps": rate, **latency})
            print(json.dumps(results["latency"][-1]), flush=True)
        kept = [r["offered_rps"] for r in results["latency"] if r["p99_ms"] < 50 and r["achieved_rps"] >= 0.95 * r[
            "offered_rps"]]
        results["highest_rate_p99_under_50ms"] = max(kept, default=None)
        print(json.dumps({"highest_rate_p99_under_50ms": results["highest_rate_p99_under_50ms"]}), flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
