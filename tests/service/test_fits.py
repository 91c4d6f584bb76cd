"""POST /models with `fits`: the chain's largest model whose GGUF file plus KV cache fits a memory budget, the
arithmetic in the answer, and the export made with the model (queued behind it, a job of its own once the model
is published); the real file's size plus its KV cache against the budget."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from cbd_engine.spec.export import device_bytes, gguf_tokenizer_bytes
from cbd_engine.spec.families import ModelSpec, read_config
from cbd_engine.spec.shapes import Shape
from tests.service.conftest import run_pending
from tests.service.test_api import assert_problem
from tests.service.test_exports import bpe_anchors

CONTEXT = 512


@pytest.fixture
def tiny_anchors(tmp_path: Path, smollm2: Path) -> tuple[Path, Path]:
    """Hidden 64 and 32: whole Q8_0 blocks at both ends of the chain (tiny_chain registers it), and widths between
    (40, 48, 56) that are not."""
    return bpe_anchors(tmp_path, smollm2, small_hidden=32)


def counted(folder: Path, shape: dict, quant: str = "Q8_0"):  # noqa: ANN201 - DeviceBytes
    """The engine's count for a shape of this chain, from the anchor's own files (not through the service)."""
    spec = ModelSpec.from_config(read_config(folder))
    tokenizer = gguf_tokenizer_bytes(json.loads((folder / "tokenizer.json").read_text()), spec.shape.vocab_size)
    return device_bytes(spec.architecture, Shape.from_dict(shape), "gguf", quant, CONTEXT, tokenizer)


def fits(memory: int | str, **extra: object) -> dict:
    return {"memory": memory, "format": "gguf", "quant": "Q8_0", "context": CONTEXT, **extra}


def test_three_budgets_get_the_largest_model_that_fits(client: TestClient, tiny_chain: dict,
                                                       tiny_anchors: tuple[Path, Path]) -> None:
    large, _ = tiny_anchors
    smallest = counted(large, tiny_chain["anchors"][1]["shape"]).total
    largest = counted(large, tiny_chain["anchors"][0]["shape"]).total
    assert smallest < largest
    for memory in (smallest + 1, (smallest + largest) // 2, largest - 1):
        plan = client.post("/models/plan", json={"chain": tiny_chain["id"], "fits": fits(memory)})
        assert plan.status_code == 200, plan.text
        arithmetic = plan.json()["fits"]
        chosen = counted(large, plan.json()["shape"])
        assert arithmetic["total_bytes"] == chosen.total <= memory == arithmetic["memory"]
        assert arithmetic["file_bytes"] + arithmetic["kv_cache_bytes"] == chosen.total
        assert arithmetic["weights_by_type"] == chosen.by_type and arithmetic["params"] == plan.json()["params"]
        following = arithmetic["next_larger"]
        assert following["params"] > arithmetic["params"]
        assert following["total_bytes"] == counted(large, following["shape"]).total > memory
    above = client.post("/models/plan", json={"chain": tiny_chain["id"], "fits": fits("1GB")}).json()
    assert above["shape"] == tiny_chain["anchors"][0]["shape"] and above["fits"]["next_larger"] is None
    assert "largest anchor" in above["fits"]["note"]


def test_a_budget_below_the_smallest_model_is_422_stating_it(client: TestClient, tiny_chain: dict,
                                                            tiny_anchors: tuple[Path, Path]) -> None:
    small = tiny_chain["anchors"][1]
    smallest = counted(tiny_anchors[0], small["shape"]).total
    for route in ("/models", "/models/plan"):
        assert_problem(client.post(route, json={"source": tiny_chain["source"], "fits": fits(smallest - 1)}), 422,
                       f"below the chain's smallest model: {small['params']} parameters take {smallest} bytes")
    assert client.get("/models").json()["items"] == []  # nothing half-made
    assert_problem(client.post("/models/plan", json={"chain": tiny_chain["id"], "fits": fits("1GB", context=4096)}),
                   422, "more than the chain's 512 positions")


def test_the_model_and_its_export_fit_the_budget(client: TestClient, settings: Settings, tiny_chain: dict,
                                                 tiny_anchors: tuple[Path, Path]) -> None:
    """The export waits for its model (no job), is queued when the model is published, and the file written plus
    its KV cache is within the budget."""
    smallest = counted(tiny_anchors[0], tiny_chain["anchors"][1]["shape"]).total
    largest = counted(tiny_anchors[0], tiny_chain["anchors"][0]["shape"]).total
    body = {"source": tiny_chain["source"], "fits": fits((smallest + largest) // 2), "alpha": 0.5}
    response = client.post("/models", json=body)
    assert response.status_code == 202, response.text
    model = response.json()
    waiting = model["fits"]["export"]
    assert waiting["status"] == "queued" and waiting["job"] is None and waiting["quant"] == "Q8_0"
    assert waiting["hub_repo_id"] == f"cbd/{model['id']}-GGUF" and model["size"] is None
    assert run_pending(settings) == ["succeeded"]  # the model; its publish queued the export's job
    assert run_pending(settings) == ["succeeded"]  # the export
    export = client.get(f"/models/{model['id']}/exports/{waiting['id']}").json()
    assert export["status"] == "ready" and [f["name"] for f in export["files"]] == ["model-Q8_0.gguf"]
    arithmetic = export["metrics"]["fits"]
    assert arithmetic == {k: v for k, v in model["fits"].items() if k != "export"}
    size = export["metrics"]["size_bytes"]
    assert size + arithmetic["kv_cache_bytes"] <= arithmetic["memory"] and size <= arithmetic["file_bytes"]
    sibling = client.get(f"/api/models/cbd/{model['id']}-GGUF").json()
    assert [s["rfilename"] for s in sibling["siblings"]] == ["model-Q8_0.gguf"]

    again = client.post("/models", json=body)  # the same request: the same model and export, nothing queued
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    assert again.json()["fits"]["export"]["id"] == export["id"] and again.json()["fits"]["export"]["status"] == "ready"
    assert run_pending(settings) == []
    # in F16 (no blocks: bytes grow with parameters) the model's own F16 bytes land on its shape, which is ready:
    # the export's job is made at once
    f16 = {**body, "fits": fits(counted(tiny_anchors[0], model["shape"], "F16").total, quant="F16")}
    assert client.post("/models/plan", json=f16).json()["shape"] == model["shape"]
    answer = client.post("/models", json=f16).json()
    assert answer["id"] == model["id"] and answer["fits"]["export"]["job"] is not None
    assert answer["fits"]["export"]["quant"] == "F16" and answer["fits"]["export"]["status"] == "queued"


def test_a_waiting_export_ends_with_its_model(client: TestClient, tiny_chain: dict,
                                              tiny_anchors: tuple[Path, Path]) -> None:
    smallest = counted(tiny_anchors[0], tiny_chain["anchors"][1]["shape"]).total
    response = client.post("/models", json={"chain": tiny_chain["id"], "fits": fits(smallest + 1)})
    assert response.status_code == 202, response.text
    model = response.json()
    assert client.post(f"/jobs/{model['job']['id']}/cancel").json()["status"] == "cancelled"
    export = client.get(f"/models/{model['id']}/exports/{model['fits']['export']['id']}").json()
    assert export["status"] == "cancelled" and export["job"] is None


def test_round_to_blocks_leaves_no_tensor_in_f16(client: TestClient, tiny_chain: dict) -> None:
    plan = client.post("/models/plan", json={"chain": tiny_chain["id"], "fits": fits("1GB", round_to_blocks=True)})
    assert plan.status_code == 200, plan.text
    arithmetic = plan.json()["fits"]
    assert arithmetic["fallback_params"] == 0 and "F16" not in arithmetic["weights_by_type"]
    assert plan.json()["shape"]["hidden_size"] % 32 == 0 and plan.json()["shape"]["intermediate_size"] % 32 == 0


def test_concurrent_fits_requests_make_one_model_and_an_export_per_quant(client: TestClient, settings: Settings,
                                                                         tiny_chain: dict) -> None:
    """Above the chain's largest model every quant lands on the largest anchor's shape: one model, and each quant's
    export waiting for it (no two requests wait for each other's lock), all queued when the model is published."""
    bodies = [{"chain": tiny_chain["id"], "fits": fits("1GB", quant=quant)} for quant in ("F16", "Q8_0", "Q4_0")] * 2
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda body: client.post("/models", json=body), bodies))
    assert {r.status_code for r in responses} <= {200, 202}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    exports = {r.json()["fits"]["export"]["quant"]: r.json()["fits"]["export"]["id"] for r in responses}
    assert len(exports) == 3 and len({r.json()["fits"]["export"]["id"] for r in responses}) == 3
    assert client.get("/jobs", params={"kind": "export_model"}).json()["items"] == []  # waiting for the model
    assert run_pending(settings) == ["succeeded"]
    queued = client.get("/jobs", params={"kind": "export_model"}).json()["items"]
    assert sorted(job["result"]["export"] for job in queued) == sorted(exports.values())
    assert {job["status"] for job in queued} == {"queued"}
