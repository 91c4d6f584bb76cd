"""Aliases and tags of models: made, moved and deleted through the API, moved concurrently without losing a move
(SQLite and PostgreSQL), followed by huggingface_hub as the repository `cbd/<alias>`, and announced by webhooks."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.main import create_app
from app.models import Job, Model
from app.settings import Settings
from tests.service.conftest import make_settings, run_pending, signed_events
from tests.service.test_api import assert_problem, make_model, midpoint


def queued_models(client: TestClient, chain: dict, count: int) -> list[str]:
    """`count` models requested (seeds 0, 1, ...) and not made: for what needs no files."""
    ids = []
    for seed in range(count):
        response = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), "seed": seed})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def marked_ready(client: TestClient, model_ids: list[str]) -> None:
    """As if made (aliases need ready models), for what never reads their files."""
    with client.app.state.session_factory() as session:
        session.execute(update(Model).where(Model.id.in_(model_ids)).values(status="ready"))
        session.execute(update(Job).where(Job.subject_id.in_(model_ids)).values(status="succeeded"))
        session.commit()


def test_an_alias_is_made_moved_and_deleted(client: TestClient, tiny_chain: dict) -> None:
    first, second, queued = queued_models(client, tiny_chain, 3)
    marked_ready(client, [first, second])
    assert_problem(client.put(f"/models/{queued}/aliases/prod"), 409, "queued")
    assert_problem(client.put("/models/mdl_none/aliases/prod"), 404)

    made = client.put(f"/models/{first}/aliases/prod")
    assert made.status_code == 201, made.text
    assert {k: made.json()[k] for k in ("name", "model", "previous", "hub_repo_id")} == {
        "name": "prod", "model": first, "previous": None, "hub_repo_id": "cbd/prod"}
    again = client.put(f"/models/{first}/aliases/prod")
    assert again.status_code == 200 and again.json() == made.json()
    assert client.get(f"/models/{first}").json()["aliases"] == ["prod"]

    moved = client.put(f"/models/{second}/aliases/prod")
    assert moved.status_code == 200 and moved.json()["model"] == second and moved.json()["previous"] == first
    assert client.get(f"/models/{first}").json()["aliases"] == []
    assert client.get(f"/models/{second}").json()["aliases"] == ["prod"]
    assert client.get("/aliases/prod").json() == moved.json()
    client.put(f"/models/{first}/aliases/staging")
    assert [a["name"] for a in client.get("/aliases").json()] == ["prod", "staging"]
    assert [a["name"] for a in client.get("/aliases", params={"model": second}).json()] == ["prod"]

    assert_problem(client.delete(f"/models/{first}/aliases/prod"), 404, second)  # it points elsewhere now
    assert client.delete(f"/models/{second}/aliases/prod").status_code == 204
    assert_problem(client.get("/aliases/prod"), 404)
    assert_problem(client.get("/api/models/cbd/prod"), 404)
    assert client.delete("/aliases/staging").status_code == 204
    assert_problem(client.delete("/aliases/staging"), 404)

    client.put(f"/models/{first}/aliases/prod")
    assert client.delete(f"/models/{first}").status_code == 204  # an alias goes with its model
    assert_problem(client.get("/aliases/prod"), 404)


def test_alias_names_are_hub_repository_names_that_no_model_id_or_sibling_takes(client: TestClient,
                                                                                 tiny_chain: dict) -> None:
    (model,) = queued_models(client, tiny_chain, 1)
    marked_ready(client, [model])
    for name in ("Prod", "a--b", "a..b", "-a", "a.", "a.git", "a" * 97, "mdl_0123", "edge-gguf", "edge-GGUF",
                 "edge-onnx", "a b", "café"):
        body = assert_problem(client.put(f"/models/{model}/aliases/{name}"), 422)
        assert body["errors"] == [{"field": "name", "message": body["errors"][0]["message"]}], name
    assert client.put(f"/models/{model}/aliases/smollm2-110m_v1.2").status_code == 201
    assert client.get("/aliases").json()[0]["name"] == "smollm2-110m_v1.2"


def test_concurrent_moves_of_one_alias_each_move_it_from_where_the_last_left_it(
        client: TestClient, settings: Settings, tiny_chain: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests read the (missing) alias before any writes it: one makes it, and the others, finding it made
    or moved, read it again; the moves form one chain and the alias ends where the last one put it."""
    from app.services import aliases

    targets = queued_models(client, tiny_chain, 3)
    marked_ready(client, targets)
    all_read = threading.Barrier(len(targets), timeout=30)
    waited = threading.local()
    write = aliases._compare_and_set

    def after_all_read(*args: object) -> bool:
        if not getattr(waited, "done", False):  # the first write of each request only
            waited.done = True
            all_read.wait()
        return write(*args)

    monkeypatch.setattr(aliases, "_compare_and_set", after_all_read)
    factory = client.app.state.session_factory
    results: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def move(model_id: str) -> None:
        try:
            with factory() as session:
                alias, _ = aliases.set_alias(session, settings, model_id, "prod", "t")
                results[alias.model] = alias.previous
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=move, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and set(results) == set(targets)
    order = [next(model for model, previous in results.items() if previous is None)]
    while len(order) < len(targets):  # each move starts where another ended: no move is lost
        order.append(next(model for model, previous in results.items() if previous == order[-1]))
    assert client.get("/aliases/prod").json()["model"] == order[-1]


def test_tags_label_models_and_filter_the_list(client: TestClient, tiny_chain: dict) -> None:
    first, second, third = queued_models(client, tiny_chain, 3)
    for model, tag in ((first, "edge"), (second, "edge"), (second, "edge"), (second, "v1.2"), (third, "server")):
        assert client.put(f"/models/{model}/tags/{tag}").status_code == 204
    assert client.get(f"/models/{second}").json()["tags"] == ["edge", "v1.2"]
    assert [m["id"] for m in client.get("/models", params={"tag": "edge"}).json()["items"]] == [second, first]
    page = client.get("/models", params={"tag": "edge", "limit": 1}).json()
    assert [m["id"] for m in page["items"]] == [second]
    rest = client.get("/models", params={"tag": "edge", "limit": 1, "page_token": page["next_page_token"]}).json()
    assert [m["id"] for m in rest["items"]] == [first] and rest["next_page_token"] is None
    assert client.get("/models", params={"tag": "none"}).json()["items"] == []

    assert client.delete(f"/models/{second}/tags/edge").status_code == 204
    assert_problem(client.delete(f"/models/{second}/tags/edge"), 404, "edge")
    assert [m["id"] for m in client.get("/models", params={"tag": "edge"}).json()["items"]] == [first]
    assert_problem(client.put(f"/models/{first}/tags/-x"), 422, "tag")
    assert_problem(client.put("/models/mdl_none/tags/edge"), 404)


def test_snapshot_download_of_an_alias_gets_the_model_it_points_at_now(live_server: tuple[str, Settings, str],
                                                                       tiny_anchors: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """Each target is its own revision (its commit id), so huggingface_hub's cache keeps both apart; a download
    begun at the old revision gets no file of the new target."""
    from huggingface_hub import snapshot_download

    from cbd_client import Client

    url, settings, token = live_server
    bearer = {"Authorization": f"Bearer {token}"}
    large, small = tiny_anchors
    client = Client(url, token=token)
    chain = client.create_chain({"name": "t", "source": str(large),
                                 "anchors": [{"checkpoint": str(small), "distill": False}]})
    assert run_pending(settings) == ["succeeded"]
    size = midpoint(client.chain(chain["id"]))
    made = [client.create_model(chain=chain["id"], size=size, seed=seed, alpha=0.5) for seed in (0, 1)]
    assert run_pending(settings) == ["succeeded", "succeeded"]
    first, second = (client.model(m["id"]) for m in made)

    def download() -> Path:
        return Path(snapshot_download("cbd/prod", endpoint=url, token=token, cache_dir=tmp_path / "hf-cache"))

    def commit(model: dict) -> str:
        return httpx.get(f"{url}/api/models/{model['hub_repo_id']}", headers=bearer).json()["sha"]

    def digests(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}

    assert client.set_alias(first["id"], "prod")["previous"] is None
    old = download()
    assert old.name == commit(first) and digests(old) == {f["name"]: f["sha256"] for f in first["files"]}

    assert client.set_alias(second["id"], "prod")["previous"] == first["id"]
    new = download()
    assert new.name == commit(second) != commit(first)
    assert digests(new) == {f["name"]: f["sha256"] for f in second["files"]} != digests(old)
    assert digests(old) == {f["name"]: f["sha256"] for f in first["files"]}  # the cache holds both, each whole
    stale = httpx.head(f"{url}/cbd/prod/resolve/{old.name}/model.safetensors", headers=bearer)
    assert stale.status_code == 404 and stale.headers["x-error-code"] == "RevisionNotFound"


def test_models_and_aliases_send_signed_webhook_events(tmp_path: Path, tiny_anchors: tuple[Path, Path],
                                                       webhook_receiver: tuple[str, list]) -> None:
    """model.failed and model.ready when a materialization ends (a damaged anchor blob fails the first; repaired,
    the same request makes it), alias.created, alias.moved and alias.deleted as the API changes an alias."""
    url, received = webhook_receiver
    settings = make_settings(tmp_path, webhook_url=url, webhook_secret="s3cret")
    large, small = tiny_anchors
    with TestClient(create_app(settings)) as client:
        client.post("/chains", json={"name": "t", "source": str(large),
                                     "anchors": [{"checkpoint": str(small), "distill": False}]})
        assert run_pending(settings) == ["succeeded"]
        assert [e["event"] for e in signed_events(received, "s3cret", 1)] == ["job.succeeded"]
        chain = client.get(f"/chains/{client.get('/chains').json()['items'][0]['id']}").json()
        weights = next(f for f in chain["anchors"][0]["files"] if f["name"] == "model.safetensors")
        blob = client.app.state.store.local_path(weights["sha256"])
        whole = blob.read_bytes()
        blob.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
        body = {"chain": chain["id"], "size": midpoint(chain), "seed": 1}
        failed = client.post("/models", json=body).json()
        assert run_pending(settings) == ["failed"]
        events = signed_events(received, "s3cret", 3)
        assert [e["event"] for e in events] == ["job.succeeded", "job.failed", "model.failed"]
        assert events[2]["model"]["id"] == failed["id"] and events[2]["model"]["status"] == "failed"
        assert events[2]["job"]["error"] == events[1]["job"]["error"] and "damaged" in events[2]["job"]["error"]

        blob.write_bytes(whole)
        assert client.post("/models", json=body).status_code == 202  # the failed model, made again
        assert run_pending(settings) == ["succeeded"]
        events = signed_events(received, "s3cret", 5)[3:]
        assert [e["event"] for e in events] == ["job.succeeded", "model.ready"]
        assert events[1]["model"] == client.get(f"/models/{failed['id']}").json()  # as made: ready, measured
        assert events[1]["model"]["status"] == "ready" and events[1]["model"]["metrics"]["dev_loss"] > 0

        client.put(f"/models/{failed['id']}/aliases/prod")
        assert [e["event"] for e in signed_events(received, "s3cret", 6)[5:]] == ["alias.created"]
        (other,) = queued_models(client, chain, 1)
        marked_ready(client, [other])
        client.put(f"/models/{other}/aliases/prod")
        moved = signed_events(received, "s3cret", 7)[6]
        assert moved["event"] == "alias.moved" and moved["alias"] == client.get("/aliases/prod").json()
        assert (moved["alias"]["model"], moved["alias"]["previous"]) == (other, failed["id"])
        client.delete("/aliases/prod")
        deleted = signed_events(received, "s3cret", 8)[7:]
        assert [(e["event"], e["alias"]["model"]) for e in deleted] == [("alias.deleted", other)]


def test_the_console_shows_a_models_aliases_and_tags(client: TestClient, settings: Settings,
                                                     tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain)["id"]
    assert "<dt>Aliases</dt>" not in client.get(f"/ui/fragments/models/{model}").text
    client.put(f"/models/{model}/aliases/prod")
    client.put(f"/models/{model}/tags/edge")
    page = client.get(f"/ui/fragments/models/{model}").text
    assert "<dt>Aliases</dt><dd><code>cbd/prod</code></dd>" in page and "<dt>Tags</dt><dd>edge</dd>" in page
