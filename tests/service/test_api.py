"""Routes and documented errors of the contract, on SQLite and (integration) PostgreSQL."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.service.conftest import run_pending

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, *words: str) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    for word in words:
        assert word in body["detail"], body
    return body


def midpoint(chain: dict) -> int:
    params = [a["params"] for a in chain["anchors"]]
    return (params[0] + params[1]) // 2


def make_model(client: TestClient, settings: Settings, chain: dict, **extra: object) -> dict:
    response = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), **extra})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == response.json()["job"]["url"]
    assert run_pending(settings) == ["succeeded"]
    return client.get(f"/models/{response.json()['id']}").json()


def test_chain_registration_reads_shapes_and_stores_files(client: TestClient, tiny_chain: dict) -> None:
    assert tiny_chain["status"] == "ready" and tiny_chain["family"] == "llama"
    assert [a["index"] for a in tiny_chain["anchors"]] == [0, 1]
    assert tiny_chain["anchors"][0]["params"] > tiny_chain["anchors"][1]["params"]
    weights = next(f for f in tiny_chain["anchors"][1]["files"] if f["name"] == "model.safetensors")
    body = client.get(weights["url"]).content
    assert hashlib.sha256(body).hexdigest() == weights["sha256"]
    listed = client.get("/chains", params={"source": tiny_chain["source"], "status": "ready"}).json()
    assert [c["id"] for c in listed["items"]] == [tiny_chain["id"]]
    assert client.get("/chains", params={"status": "failed"}).json()["items"] == []


def test_model_lifecycle_and_identity(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain, dtype="float32")
    assert model["status"] == "ready"
    assert model["anchors"] == [tiny_chain["anchors"][1]["id"], tiny_chain["anchors"][0]["id"]]
    assert abs(model["params"] - midpoint(tiny_chain)) <= 0.03 * midpoint(tiny_chain) or model["shape"]
    assert 0 <= model["alpha"] <= 1 and "validation_loss" in model["metrics"]
    assert {f["name"] for f in model["files"]} >= {"config.json", "model.safetensors", "cbd.json"}
    job = client.get(model["job"]["url"]).json()
    assert job["status"] == "succeeded" and job["result"]["model"] == model["id"] and job["finished_at"].endswith("Z")
    # the same request (size as a string this time) returns the existing model with 200
    again = client.post("/models", json={"source": tiny_chain["source"], "size": str(midpoint(tiny_chain)),
                                         "dtype": "float32"})
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    # another seed is another model
    other = client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain), "seed": 1,
                                         "dtype": "float32"})
    assert other.status_code == 202 and other.json()["id"] != model["id"]
    listed = client.get("/models", params={"chain": tiny_chain["id"], "status": "ready"}).json()["items"]
    assert [m["id"] for m in listed] == [model["id"]]


def test_shape_requests_and_chain_fixed_fields(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    shape = dict(tiny_chain["anchors"][1]["shape"], num_layers=3)
    response = client.post("/models", json={"chain": tiny_chain["id"], "shape": shape})
    assert response.status_code == 202, response.text
    assert response.json()["shape"]["num_layers"] == 3
    assert_problem(client.post("/models", json={"chain": tiny_chain["id"], "shape": dict(shape, vocab_size=5)}),
                   422, "vocab_size")


@pytest.mark.parametrize(("body", "field"), [
    ({"size": "1G"}, "outside"),
    ({"size": 10}, "outside"),
    ({"size": "lots"}, "size"),
    ({"size": -5}, "size"),
    ({"size": "50K", "alpha": 1.5}, "alpha"),
    ({"size": "50K", "alpha": True}, "alpha"),  # a boolean is not a number here
    ({"size": "50K", "alpha": "0.5"}, "alpha"),
    ({"size": "50K", "alpha": "default"}, "alpha"),
    ({"size": "50K", "mix": "linear"}, "mix"),
    ({"size": "50K", "heal": {"steps": True}}, "heal.steps"),
    ({"size": "50K", "heal": {"steps": 0}}, "heal.steps"),
    ({"size": "50K", "heal": {"steps": 10, "learning_rate": True}}, "heal.learning_rate"),
    ({"size": "50K", "heal": {"learning_rate": 0.001}}, "heal.steps"),
    ({"size": "50K", "dtype": "int8"}, "dtype"),
    ({"size": "50K", "init": "magic"}, "init"),
    ({}, "exactly one of size, shape or fits, got none"),
    ({"size": "50K", "fits": {"memory": "300MB"}}, "exactly one of size, shape or fits, got ['size', 'fits']"),
    ({"fits": {"memory": "300XB"}}, "fits.memory"),
    ({"fits": {"memory": True}}, "fits.memory"),
    ({"fits": {"memory": "300MB", "quant": "Q3_K"}}, "Q8_0"),
    ({"fits": {"memory": "300MB", "format": "onnx", "quant": "fp32"}}, "fits counts the bytes of gguf files only"),
    ({"fits": {"memory": "300MB", "context": 0}}, "fits.context"),
    ({"fits": {"memory": "300MB", "context": 64}}, "byte-level BPE"),  # the tiny chain's: a character tokenizer
])
def test_bad_model_requests_are_422_naming_the_field(client: TestClient, tiny_chain: dict, body: dict,
                                                      field: str) -> None:
    problem = assert_problem(client.post("/models", json={"chain": tiny_chain["id"], **body}), 422)
    assert field in problem["detail"]


def test_alpha_as_requested_mix_and_heal_are_the_identity(client: TestClient, tiny_chain: dict) -> None:
    """"auto" (the default, and null) matches "auto", not the value it resolves to; "proportional", a number, the
    mix and the heal steps each make another model."""
    client.app.state.settings.max_concurrent_jobs = 0
    base = {"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}

    def post(status: int, **extra: object) -> dict:
        response = client.post("/models", json={**base, **extra})
        assert response.status_code == status, (extra, response.text)
        return response.json()

    auto = post(202)
    assert (auto["alpha"], auto["alpha_request"], auto["mix"], auto["heal"]) == ("auto", "auto", "unit", None)
    for same in ({"alpha": "auto"}, {"alpha": None}, {"mix": "unit"}, {"heal": None}):
        assert post(200, **same)["id"] == auto["id"]
    proportional = post(202, alpha="proportional")
    half = post(202, alpha=0.5)
    assert post(200, alpha=0.50)["id"] == half["id"] and half["alpha"] == half["alpha_request"] == 0.5
    zero = post(202, alpha=0)
    paper = post(202, mix="paper")
    healed = post(202, heal={"steps": 5})
    assert post(200, heal={"steps": 5, "learning_rate": None})["id"] == healed["id"]
    assert healed["heal"] == {"steps": 5, "learning_rate": None}
    other_heal = post(202, heal={"steps": 5, "learning_rate": 1e-4})
    ids = [m["id"] for m in (auto, proportional, half, zero, paper, healed, other_heal)]
    assert len(set(ids)) == len(ids)


def test_estimates_count_auto_alpha_and_heal_steps(client: TestClient, tiny_chain: dict) -> None:
    client.app.state.settings.max_concurrent_jobs = 0
    base = {"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}

    def estimate(**extra: object) -> float:
        job = client.post("/models", json={**base, **extra}).json()["job"]
        return client.get(job["url"]).json()["progress"]["estimated_seconds"]

    fixed = estimate(alpha=0.5)
    assert estimate(alpha="auto", seed=1) > fixed
    healed = estimate(alpha=0.5, heal={"steps": 100}, seed=2)
    assert healed > fixed and estimate(alpha=0.5, heal={"steps": 1000}, seed=3) > healed


def test_models_of_a_source_whose_chain_is_being_built_are_409(client: TestClient, tiny_anchors: tuple) -> None:
    chain = client.post("/chains", json=_chain_body(tiny_anchors, "building")).json()
    response = client.post("/models", json={"source": str(tiny_anchors[0]), "size": "50K"})
    assert_problem(response, 409, chain["id"], "being built", chain["job"]["id"])


def test_the_api_offers_exactly_the_engines_options(client: TestClient) -> None:
    """Values and defaults of POST /models and of POST /chains' distillation are the engine's."""
    from dataclasses import fields
    from typing import Literal, get_args

    from app import schemas
    from cbd_engine.spec import distill_config, options
    from cbd_engine.spec.chain import CHAIN_ONLY_KEYS

    create = schemas.ModelCreate.model_fields
    assert get_args(create["init"].annotation) == options.INITS and get_args(create["mix"].annotation) == options.MIXES
    assert Literal[options.ALPHA_MODES] in get_args(create["alpha"].annotation)
    distillation = schemas.DistillationIn.model_fields
    assert get_args(distillation["loss"].annotation) == (Literal[distill_config.LOSSES], type(None))
    assert get_args(distillation["mode"].annotation) == distill_config.MODES
    recipe = {f.name: f.default for f in fields(distill_config.DistillConfig)}
    assert set(distillation) - set(recipe) <= set(CHAIN_ONLY_KEYS)
    assert {name: f.default for name, f in distillation.items() if name in recipe} == \
        {name: recipe[name] for name in distillation if name in recipe}
    document = client.get("/openapi.json").json()["components"]["schemas"]
    assert document["DistillationIn"]["properties"]["steps"]["default"] == recipe["steps"]
    assert set(document["ModelCreate"]["properties"]) >= {"alpha", "mix", "heal"}
    assert set(document["ModelOut"]["properties"]) >= {"alpha_request", "mix", "heal"}
    assert "warnings" in document["JobResult"]["properties"]


@pytest.mark.parametrize(("loss", "accepted"), [("jsd", True), ("skew_reverse_kl", True), ("ce", True),
                                                ("js", False), ("tvd", False), ("sft", False)])
def test_chain_losses_are_the_engines(client: TestClient, tiny_anchors: tuple, loss: str, accepted: bool) -> None:
    from tests.service.conftest import DOLLY

    body = {"name": "c", "source": str(tiny_anchors[0]), "anchors": [{"size": "40K"}], "dataset": {"path": str(DOLLY)},
            "distillation": {"loss": loss}}
    response = client.post("/chains", json=body)
    if accepted:
        assert response.status_code == 202, response.text
    else:
        assert_problem(response, 422, "distillation.loss")


def test_unknown_source_and_ids(client: TestClient) -> None:
    assert_problem(client.post("/models", json={"source": "org/none", "size": "1M"}), 422, "no ready chain")
    for path in ("/models/x", "/chains/x", "/jobs/x", "/models/x/files/config.json", "/nowhere"):
        assert_problem(client.get(path), 404)
    assert_problem(client.post("/jobs/x/cancel"), 404)
    assert_problem(client.delete("/models/x"), 404)


def test_chain_request_validation(client: TestClient, settings: Settings, tmp_path) -> None:  # noqa: ANN001
    base = {"name": "c", "source": "org/model", "anchors": [{"size": "10M"}], "dataset": {"path": "/etc/passwd"}}
    assert_problem(client.post("/chains", json=base), 422, "dataset.path", "allowed roots")
    assert_problem(client.post("/chains", json=dict(base, source="/etc")), 422, "source")
    assert_problem(client.post("/chains", json=dict(base, anchors=[])), 422, "anchors")
    assert_problem(client.post("/chains", json=dict(base, anchors=[{"size": "1M", "shape": None, "checkpoint": "x"}])),
                   422, "exactly one")
    assert_problem(client.post("/chains", json=dict(base, device="tpu")), 422, "device")
    assert_problem(client.post("/chains", json={k: v for k, v in base.items() if k != "dataset"}), 422, "dataset")
    assert_problem(client.post("/chains", content=b"{", headers={"content-type": "application/json"}), 422)
    assert_problem(client.post("/chains", content=b"x" * (settings.max_body_bytes + 1),
                               headers={"content-type": "application/json"}), 413)


def test_pagination(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    for seed in range(3):
        client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain), "seed": seed})
    seen, token = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"page_token": token} if token else {})}).json()
        seen += [j["id"] for j in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen)) == 4  # the chain's job and three model jobs, newest first
    assert seen == sorted(seen, reverse=True)
    assert_problem(client.get("/jobs", params={"page_token": "!!"}), 422, "page_token")
    assert_problem(client.get("/jobs", params={"limit": 0}), 422, "limit")
    assert len(client.get("/jobs", params={"kind": "build_chain"}).json()["items"]) == 1


def test_idempotency_key(client: TestClient, tiny_chain: dict) -> None:
    body = {"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}
    first = client.post("/models", json=body, headers={"Idempotency-Key": "k1"})
    second = client.post("/models", json=body, headers={"Idempotency-Key": "k1"})
    assert first.json()["id"] == second.json()["id"]
    assert_problem(client.post("/models", json=dict(body, seed=7), headers={"Idempotency-Key": "k1"}), 409)


def _chain_body(tiny_anchors: tuple, name: str) -> dict:
    large, small = tiny_anchors
    return {"name": name, "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "device": "cpu"}


def test_identical_requests_racing_with_one_idempotency_key_make_one_chain(client: TestClient,
                                                                            tiny_anchors: tuple) -> None:
    body = _chain_body(tiny_anchors, "raced")
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/chains", json=body, headers={"Idempotency-Key": "race"}),
                                  range(8)))
    assert {r.status_code for r in responses} <= {200, 202, 409}, [r.text for r in responses]
    made = {r.json()["id"] for r in responses if r.status_code in (200, 202)}
    assert len(made) == 1
    assert [c["id"] for c in client.get("/chains").json()["items"] if c["name"] == "raced"] == list(made)


def test_idempotency_key_is_released_when_its_request_fails_and_taken_over_when_abandoned(
        client: TestClient, settings: Settings, tiny_anchors: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from sqlalchemy import update

    from app.db import make_engine
    from app.errors import ApiError
    from app.models import IdempotencyKey, utcnow
    from app.services import chains, idempotency

    body = _chain_body(tiny_anchors, "retried")

    def unavailable(*args: object, **kwargs: object) -> None:
        raise ApiError(503, "the job queue is unavailable")

    monkeypatch.setattr(chains, "create_chain", unavailable)
    assert_problem(client.post("/chains", json=body, headers={"Idempotency-Key": "retry"}), 503)
    monkeypatch.undo()
    assert client.post("/chains", json=body, headers={"Idempotency-Key": "retry"}).status_code == 202

    # a request whose process died after claiming its key: the claim is neither completed nor released
    monkeypatch.setattr(chains, "create_chain", unavailable)
    monkeypatch.setattr(idempotency, "_releasing_on_error", lambda *args: contextlib.nullcontext())
    assert_problem(client.post("/chains", json=body, headers={"Idempotency-Key": "orphan"}), 503)
    monkeypatch.undo()
    assert_problem(client.post("/chains", json=body, headers={"Idempotency-Key": "orphan"}), 409, "in progress")
    engine = make_engine(settings.resolved_database_url)
    with engine.begin() as connection:
        connection.execute(update(IdempotencyKey).where(IdempotencyKey.key == "orphan")
                           .values(created_at=utcnow() - 2 * idempotency.ABANDONED_AFTER))
    engine.dispose()
    taken = client.post("/chains", json=body, headers={"Idempotency-Key": "orphan"})
    assert taken.status_code == 202, taken.text
    again = client.post("/chains", json=body, headers={"Idempotency-Key": "orphan"})
    assert again.status_code == 200 and again.json()["id"] == taken.json()["id"]


def test_concurrent_identical_requests_materialize_once(client: TestClient, settings: Settings,
                                                         tiny_chain: dict) -> None:
    body = {"chain": tiny_chain["id"], "size": midpoint(tiny_chain), "seed": 3}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/models", json=body), range(8)))
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.status_code == 202 for r in responses) == 1
    assert len(client.get("/jobs", params={"kind": "materialize_model"}).json()["items"]) == 1


def test_cancel_queued_job_and_retry(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    model = client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}).json()
    cancelled = client.post(f"/jobs/{model['job']['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert client.get(f"/models/{model['id']}").json()["status"] == "cancelled"
    assert_problem(client.post(f"/jobs/{model['job']['id']}/cancel"), 409, "finished")
    assert run_pending(settings) == []
    again = client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)})
    assert again.status_code == 202 and again.json()["id"] == model["id"]  # a cancelled model is made on request


def test_delete_model_removes_files(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain)
    weights = next(f for f in model["files"] if f["name"] == "model.safetensors")
    client.app.state.settings.blob_grace_seconds = 0.0  # collected at once, however young
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert_problem(client.get(f"/models/{model['id']}"), 404)
    assert client.app.state.store.local_path(weights["sha256"]) is None


def test_budget_refuses_with_the_estimate(client: TestClient, tiny_chain: dict) -> None:
    client.app.state.settings.job_budget_seconds = 0.0
    assert_problem(client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}), 422,
                   "estimated at", "budget")


def test_concurrent_job_cap(client: TestClient, tiny_chain: dict) -> None:
    client.app.state.settings.max_concurrent_jobs = 1
    assert client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}).status_code == 202
    response = client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain), "seed": 9})
    assert_problem(response, 429, "cap")
    assert response.headers["retry-after"]


def test_evaluation_job(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain)
    response = client.post(f"/models/{model['id']}/evaluations", json={"tasks": ["validation_loss"]})
    assert response.status_code == 202 and response.headers["location"] == response.json()["url"]
    assert run_pending(settings) == ["succeeded"]
    assert_problem(client.post(f"/models/{model['id']}/evaluations", json={"tasks": []}), 422, "tasks")
    assert_problem(client.post(f"/models/{model['id']}/evaluations", json={"tasks": ["mmlu"]}), 422, "tasks.0")
    assert_problem(client.post(f"/models/{model['id']}/evaluations",
                               json={"tasks": ["validation_loss", "perplexity=/etc/passwd"]}), 422, "allowed roots")
    keyed = [client.post(f"/models/{model['id']}/evaluations", json={"tasks": ["validation_loss"]},
                         headers={"Idempotency-Key": "e1"}).json()["id"] for _ in range(2)]
    assert keyed[0] == keyed[1]


def test_operations(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "embedded", "storage": "ok"}
    metrics = client.get("/metrics").text
    assert 'cbd_jobs{kind="build_chain",state="succeeded"} 1.0' in metrics
    assert "cbd_chain_build_duration_seconds_count 1.0" in metrics
    assert "cbd_materialization_duration_seconds_bucket" in metrics
    assert client.get("/docs").status_code == 200


def test_openapi_matches_the_contract(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    routes = {(path, method) for path, item in document["paths"].items() for method in item}
    for route in [("/chains", "post"), ("/chains", "get"), ("/chains/{chain_id}", "get"), ("/models", "post"),
                  ("/models", "get"), ("/models/{model_id}", "get"), ("/models/{model_id}", "delete"),
                  ("/models/{model_id}/evaluations", "post"), ("/jobs", "get"), ("/jobs/{job_id}", "get"),
                  ("/jobs/{job_id}/cancel", "post"), ("/models/{model_id}/files/{name}", "get"),
                  ("/models/{model_id}/files/{name}", "head"),
                  ("/chains/{chain_id}/anchors/{index}/files/{name}", "get"),
                  ("/api/models/cbd/{model_id}", "get"), ("/api/models/cbd/{model_id}/revision/{revision}", "get"),
                  ("/api/models/cbd/{model_id}/tree/{revision}", "get"),
                  ("/cbd/{model_id}/resolve/{revision}/{filename}", "head"), ("/healthz", "get"), ("/readyz", "get"),
                  ("/metrics", "get"), ("/models/{model_id}/aliases/{name}", "put"),
                  ("/models/{model_id}/aliases/{name}", "delete"), ("/aliases", "get"), ("/aliases/{name}", "get"),
                  ("/aliases/{name}", "delete"), ("/models/{model_id}/tags/{tag}", "put"),
                  ("/models/{model_id}/tags/{tag}", "delete")]:
        assert route in routes, route
    schemas = document["components"]["schemas"]
    assert set(schemas["ModelOut"]["properties"]) >= {"id", "chain", "size", "params", "shape", "alpha", "init",
                                                      "dtype", "anchors", "status", "metrics", "files", "provenance",
                                                      "aliases", "tags", "created_at"}
    assert set(schemas["JobOut"]["properties"]) >= {"id", "kind", "status", "progress", "error", "result",
                                                    "created_at", "started_at", "finished_at"}
    assert set(schemas["Progress"]["properties"]) >= {"stage", "step", "total", "fraction", "eta_seconds", "loss"}
    assert set(schemas["Problem"]["properties"]) == {"type", "title", "status", "detail", "errors"}
    assert {"size", "shape", "fits"} <= set(schemas["ModelCreate"]["properties"])
    assert set(schemas["FitsIn"]["properties"]) == {"memory", "format", "quant", "context", "round_to_blocks"}
    assert {"fits"} <= set(schemas["ModelOut"]["properties"]) & set(schemas["ModelPlan"]["properties"])
    assert {"weights_by_type", "kv_cache_bytes", "total_bytes", "memory", "next_larger", "export"} <= set(
        schemas["FitsOut"]["properties"])
    assert "HTTPBearer" in document["components"]["securitySchemes"]
    post_models = document["paths"]["/models"]["post"]["responses"]
    assert {"200", "202", "401", "403", "409", "422", "429"} <= set(post_models)


def test_nul_bytes_anywhere_are_client_errors(client: TestClient, tiny_chain: dict) -> None:
    assert_problem(client.get("/models/a%00b"), 404)
    assert_problem(client.get("/models", params={"source": "a\x00b"}), 422)
    assert_problem(client.post("/models", json={"source": "a\x00b", "size": "1M"}), 422)
    anchors = [{"checkpoint": tiny_chain["source"], "distill": False}]
    assert_problem(client.post("/chains", json={"name": "a\x00", "source": tiny_chain["source"], "anchors": anchors}),
                   422)


def test_api_process_never_imports_torch(tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    code = ("import sys, time; t = time.monotonic(); import cbd_cli; cbd_cli.build_parser(); "
            "from app.main import create_app; from app.settings import Settings; "
            f"app = create_app(Settings(data_dir={str(tmp_path)!r})); app.openapi(); "
            "import worker.celery_app; "
            "heavy = [m for m in ('torch', 'transformers', 'worker.tasks') if m in sys.modules]; "
            "print(heavy, round(time.monotonic() - t, 2))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("[] "), result.stdout


def test_every_model_is_published_with_a_hub_model_card(client: TestClient, settings: Settings,
                                                       tiny_chain: dict) -> None:
    from huggingface_hub import ModelCard

    model = make_model(client, settings, tiny_chain)
    readme = next(f for f in model["files"] if f["name"] == "README.md")
    card = ModelCard(client.get(readme["url"]).text)
    assert card.data.model_name == f"cbd/{model['id']}" and card.data.library_name == "transformers"
    assert "cbd" in card.data.tags and card.data.license
    losses = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert losses["dev loss (this model)"] == round(model["metrics"]["dev_loss"], 4)
    assert f"{model['params']:,}" in card.text and f'snapshot_download("cbd/{model["id"]}"' in card.text
    assert f'snapshot_download("cbd/{model["id"]}-ONNX"' in card.text  # a Llama model: ONNX Runtime's usage too
    groups = dict(part.rsplit(" ", 1) for part in card.text.split("by tensor group: ")[1].split(".\n")[0].split(", "))
    assert sum(int(n.replace(",", "")) for n in groups.values()) == model["params"]  # every tensor counted once
    assert "| path between the anchors | not trained" in card.text  # registered anchors: no line training


def test_chains_take_trained_paths_and_refuse_other_kinds(client: TestClient, tiny_chain: dict) -> None:
    body = {"name": "line", "source": tiny_chain["source"], "anchors": [{"size": "1M"}],
            "dataset": {"path": "/nonexistent.jsonl"}, "device": "cpu"}
    for bad in ({"kind": "slimmable"}, {"kind": "line", "weight": 0}, {"kind": "line", "alpha": 1}):
        response = client.post("/chains", json={**body, "distillation": {"interpolation": bad}})
        assert_problem(response, 422)
        assert "interpolation" in response.text
