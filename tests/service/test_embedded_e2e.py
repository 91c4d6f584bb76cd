"""Embedded mode end to end with the real SmolLM2-135M-Instruct: `cbd serve` (SQLite, local artifacts, its own
worker process), a chain registered from SmolLM2-derived anchors, a model materialized between them while its worker
is SIGKILLed and the whole service restarted, every file downloaded, checked, loaded and used to generate text."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DOLLY, SHARED_DATA, free_port

pytestmark = pytest.mark.slow
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
BOOLQ = SHARED_DATA / "multiple_choice" / "boolq_dev.jsonl"


@pytest.fixture(scope="module")
def derived_anchor(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    from cbd_engine.materialization.recipe import materialize

    out = tmp_path_factory.mktemp("anchors") / "smollm2-90M"
    materialize(out, large=smollm2, size="90M", dtype="float32")
    return out


class Service:
    def __init__(self, data: Path, roots: list[Path]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CBD_DATA_DIR": str(data), "CBD_PORT": str(self.port),
                    "CBD_ALLOWED_SOURCE_ROOTS": ":".join(map(str, roots)), "CBD_LEASE_SECONDS": "4",
                    "CBD_HEARTBEAT_SECONDS": "1", "CBD_VALIDATION_ROWS": "4",
                    "CBD_RATE_LIMIT_PER_MINUTE": "0"}  # the test polls jobs every 50 ms
        self.log = data.parent / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cbd_cli", "serve"], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() - started < 30, "cbd serve did not start in 30 s"
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)

    def worker_pid(self, kind: str) -> int:
        """The embedded worker running jobs of this kind: a child process of `cbd serve`."""
        tasks = Path(f"/proc/{self.process.pid}/task").iterdir()  # the supervisor threads started them
        children = [pid for task in tasks for pid in (task / "children").read_text().split()]
        lanes = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode() for pid in children}
        assert sorted(lanes.values()) == ["build_chain", "materialize_model,evaluate_model,export_model"], lanes
        return next(int(pid) for pid, lane in lanes.items() if kind in lane.split(","))


@pytest.fixture
def service(tmp_path: Path, derived_anchor: Path) -> Iterator[Service]:
    service = Service(tmp_path / "data", [derived_anchor.parent, SHARED_DATA])
    service.start()
    yield service
    if service.process.poll() is None:
        service.stop()


def test_a_model_is_materialized_while_a_chain_is_being_built(tmp_path: Path, tiny_anchors: tuple[Path, Path]) -> None:
    """The embedded workers' lanes: a materialization does not wait behind a chain build that takes hours."""
    large, small = tiny_anchors
    service = Service(tmp_path / "data", [tmp_path, SHARED_DATA])
    service.start()
    try:
        client = httpx.Client(base_url=service.url, timeout=60)
        ready = client.post("/chains", json={"name": "ready", "source": str(large),
                                             "anchors": [{"checkpoint": str(small), "distill": False}]}).json()
        assert wait_for(client, ready["job"]["id"], ("succeeded", "failed"), 120)["status"] == "succeeded"
        building = client.post("/chains", json={
            "name": "building", "source": str(large), "dataset": {"path": str(DOLLY)},
            "anchors": [{"shape": {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1,
                                   "head_dim": 16, "intermediate_size": 64}}],
            "distillation": {"steps": 1_000_000, "batch_size": 2, "max_length": 32}}).json()
        wait_for(client, building["job"]["id"], ("running",), 60)
        params = [a["params"] for a in client.get(f"/chains/{ready['id']}").json()["anchors"]]
        model = client.post("/models", json={"chain": ready["id"], "size": sum(params) // 2}).json()
        assert wait_for(client, model["job"]["id"], ("succeeded", "failed"), 120)["status"] == "succeeded"
        assert client.get(f"/jobs/{building['job']['id']}").json()["status"] == "running"
        assert client.post(f"/jobs/{building['job']['id']}/cancel").status_code == 202
        assert wait_for(client, building["job"]["id"], ("cancelled", "failed"), 120)["status"] == "cancelled"
    finally:
        service.stop()


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 600) -> dict:
    """A bound on a wait, not a speed check: a materialization run twice (the killed worker's attempt, then its
    restart's), with importance, alpha search, validation and samples on the real model, takes minutes on a loaded
    2-core machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = client.get(f"/jobs/{job_id}").json()
            if job["status"] in states:
                return job
        except httpx.TransportError:  # the service is restarting
            pass
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s")


def test_embedded_service_end_to_end(service: Service, derived_anchor: Path, tmp_path: Path) -> None:
    client = httpx.Client(base_url=service.url, timeout=60)
    chain = client.post("/chains", json={"name": "smollm2", "source": SOURCE, "dataset": {"path": str(DOLLY)},
                                         "anchors": [{"checkpoint": str(derived_anchor), "distill": False}]})
    assert chain.status_code == 202, chain.text
    assert wait_for(client, chain.json()["job"]["id"], ("succeeded", "failed"))["status"] == "succeeded"
    anchors = client.get(f"/chains/{chain.json()['id']}").json()["anchors"]
    assert [a["params"] > 0 and a["metrics"]["validation_loss"] > 0 for a in anchors] == [True, True]

    # a worker killed in the middle of a job: its restart finishes the job, once
    created = client.post("/models", json={"source": SOURCE, "size": "110M", "dtype": "float32"})
    assert created.status_code == 202, created.text
    job_id = created.json()["job"]["id"]
    wait_for(client, job_id, ("running",))
    os.kill(service.worker_pid("materialize_model"), signal.SIGKILL)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
    job = wait_for(client, job_id, ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["attempts"] == 2, job

    # the whole service restarted during a job: nothing is lost
    second = client.post("/models", json={"source": SOURCE, "size": "120M", "dtype": "float32"}).json()
    wait_for(client, second["job"]["id"], ("running",))
    service.stop()
    service.start()
    assert wait_for(client, second["job"]["id"], ("succeeded", "failed"))["status"] == "succeeded"

    model = client.get(f"/models/{created.json()['id']}").json()
    assert model["status"] == "ready" and 100e6 < model["params"] < 120e6
    assert model["metrics"]["validation_loss"] > 0
    assert model["provenance"]["params"] == model["params"] and len(json.dumps(model)) < 100_000  # terms: cbd.json
    assert set(model["metrics"]["anchors_validation_loss"]) == {a["id"] for a in anchors}
    again = client.post("/models", json={"source": SOURCE, "size": 110_000_000, "dtype": "float32"})
    assert again.status_code == 200 and again.json()["id"] == model["id"]

    folder = tmp_path / "download"
    folder.mkdir()
    for item in model["files"]:
        body = client.get(item["url"]).content
        assert hashlib.sha256(body).hexdigest() == item["sha256"]
        (folder / item["name"]).write_bytes(body)
    weights = next(f for f in model["files"] if f["name"] == "model.safetensors")
    tail = client.get(weights["url"], headers={"Range": f"bytes={weights['size'] - 1000}-"})
    assert tail.status_code == 206 and tail.content == (folder / "model.safetensors").read_bytes()[-1000:]

    evaluation = client.post(f"/models/{model['id']}/evaluations",
                             json={"tasks": ["validation_loss", f"multiple_choice={BOOLQ}"], "limit": 4})
    assert evaluation.status_code == 202, evaluation.text
    assert wait_for(client, evaluation.json()["id"], ("succeeded", "failed"))["status"] == "succeeded"
    metrics = client.get(f"/models/{model['id']}").json()["metrics"]
    assert metrics["validation_loss"] == model["metrics"]["validation_loss"]
    assert 0 <= metrics["multiple_choice:boolq_dev"]["metrics"]["acc"]["value"] <= 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert loaded.num_parameters() == model["params"]
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = loaded.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(output[0][inputs["input_ids"].shape[1]:]).strip()
