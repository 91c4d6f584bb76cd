"""The demo chain of `cbd serve --demo`: queued at once for the workers (nothing built here: its jobs are never run
in these tests), never twice, and a demo chain of an older recipe replaced with everything it owns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import make_engine, make_session_factory
from app.models import Artifact, Chain, Job
from app.settings import Settings
from cbd_engine.data.calibration import DEFAULT_SET
from cbd_engine.spec.sources import SMOLLM2_ID
from tests.service.conftest import free_port, run_pending
from tests.service.test_api import make_model
from worker.demo import DEMO_ANCHOR_SIZE, DEMO_DISTILLATION, DEMO_NAME, DEMO_OWNER, demo_chain_name, ensure_demo_chain


def build_jobs(settings: Settings) -> list[Job]:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        found = list(session.scalars(select(Job).where(Job.kind == "build_chain").order_by(Job.id)))
    engine.dispose()
    return found


def set_status(settings: Settings, chain_id: str, job_id: str, status: str) -> None:
    engine = make_engine(settings.resolved_database_url)
    with engine.begin() as connection:
        connection.execute(update(Chain).where(Chain.id == chain_id).values(status=status))
        connection.execute(update(Job).where(Job.id == job_id).values(status=status))
    engine.dispose()


def test_the_demo_chain_is_queued_at_once_and_built_once(client: TestClient, settings: Settings) -> None:
    started = time.monotonic()
    chain, job = ensure_demo_chain(settings)
    assert time.monotonic() - started < 10  # a few database writes, no model work
    assert (chain.name, chain.owner, chain.status, chain.source) == (demo_chain_name(), DEMO_OWNER, "queued",
                                                                    SMOLLM2_ID)
    assert chain.spec["anchors"] == [{"size": DEMO_ANCHOR_SIZE, "checkpoint": None, "shape": None, "distill": True}]
    assert chain.spec["dataset"]["path"] == str(DEFAULT_SET.resolve())  # the package's own: no ../shared needed
    assert DEMO_DISTILLATION.items() <= chain.spec["distillation"].items()
    listed = client.get(f"/chains/{chain.id}").json()
    assert listed["status"] == "queued" and listed["job"]["id"] == job.id
    assert client.get(f"/jobs/{job.id}").json()["progress"]["estimated_seconds"] > 0
    for status in ("queued", "running", "ready"):  # a second `cbd serve --demo` builds nothing more
        set_status(settings, chain.id, job.id, status)
        again, again_job = ensure_demo_chain(settings)
        assert (again.id, again_job.id) == (chain.id, job.id)
    assert [j.id for j in build_jobs(settings)] == [job.id]
    set_status(settings, chain.id, job.id, "failed")  # a failed build is built anew
    rebuilt, _ = ensure_demo_chain(settings)
    assert rebuilt.id != chain.id and client.get(f"/chains/{chain.id}").status_code == 404
    assert len(build_jobs(settings)) == 1


def test_an_older_recipes_demo_chain_is_replaced_with_all_it_owns(client: TestClient, settings: Settings,
                                                                  tiny_chain: dict, tiny_anchors: tuple) -> None:
    large, small = tiny_anchors
    model = make_model(client, settings, tiny_chain, dtype="float32")
    other = client.post("/chains", json={"name": "other", "source": str(large),  # shares the anchors' files
                                         "anchors": [{"checkpoint": str(small), "distill": False}]}).json()
    assert run_pending(settings) == ["succeeded"]
    engine = make_engine(settings.resolved_database_url)
    with engine.begin() as connection:  # what recipe 1 left: a registered chain named smollm2-demo, and its model
        connection.execute(update(Chain).where(Chain.id == tiny_chain["id"]).values(name=DEMO_NAME, owner=DEMO_OWNER))
    old_jobs = [tiny_chain["job"]["id"], model["job"]["id"]]
    store = client.app.state.store
    model_only = {f["sha256"] for f in model["files"]} - {f["sha256"] for a in tiny_chain["anchors"]
                                                          for f in a["files"]}
    shared = {f["sha256"] for f in tiny_chain["anchors"][1]["files"]}

    settings.blob_grace_seconds = 0.0  # collected at once, however young
    chain, _ = ensure_demo_chain(settings)
    assert chain.name == demo_chain_name() and chain.id != tiny_chain["id"]
    for gone in (f"/chains/{tiny_chain['id']}", f"/models/{model['id']}", *(f"/jobs/{j}" for j in old_jobs)):
        assert client.get(gone).status_code == 404, gone
    anchor_ids = [a["id"] for a in tiny_chain["anchors"]]
    with make_session_factory(engine)() as session:
        owners = set(session.scalars(select(Artifact.owner_id)))
    assert owners.isdisjoint({model["id"], *anchor_ids})
    assert model_only and all(store.local_path(sha) is None for sha in model_only)
    assert all(store.local_path(sha) is not None for sha in shared)  # the other chain still has them
    weights = next(f for f in client.get(f"/chains/{other['id']}").json()["anchors"][1]["files"]
                   if f["name"] == "model.safetensors")
    assert client.get(weights["url"]).status_code == 200
    engine.dispose()


def test_cbd_serve_demo_listens_at_once_and_shows_the_chain_being_built(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CBD_DATA_DIR": str(tmp_path / "data"), "CBD_PORT": str(port),
           "CBD_EMBEDDED_WORKER": "false"}  # nothing builds SmolLM2 in this test
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        serve = subprocess.Popen([sys.executable, "-m", "cbd_cli", "serve", "--demo"], env=env, stdout=output,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                chains = httpx.get(f"http://127.0.0.1:{port}/chains").json()["items"]
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and serve.poll() is None, log.read_text()
                time.sleep(0.2)
        assert [(c["name"], c["status"]) for c in chains] == [(demo_chain_name(), "queued")]
        assert f"/jobs/{chains[0]['job']['id']}" in log.read_text()
    finally:
        serve.terminate()
        serve.wait(30)
