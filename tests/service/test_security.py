"""The promises of docs/SECURITY.md, as a `build` token holder would test them on a loopback server."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.auth import create_token
from app.logging import JsonFormatter
from app.main import create_app
from app.services.files import record_files
from app.services.webhooks import deliver
from app.settings import Settings
from app.storage import StoredFile, sha256_file
from cbd_cli.service import server_config
from tests.service.conftest import make_settings, run_pending
from tests.service.test_api import assert_problem, make_model, midpoint


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the allowed roots (the tests' roots are the test's own tmp_path and the shared data)."""
    folder = tmp_path_factory.mktemp("secretdata")
    (folder / "secret.txt").write_text("CBD_DATABASE_URL=postgresql://cbd:hunter2@db/cbd\n")
    return folder


def registration(large: Path, checkpoint: Path, **extra: object) -> dict:
    return {"name": "t", "source": str(large), "anchors": [{"checkpoint": str(checkpoint), "distill": False}],
            "device": "cpu"} | extra


# --- 1. links in registered folders ----------------------------------------------------------------------------


def test_a_link_outside_the_roots_is_refused_at_registration(client: TestClient, tiny_anchors: tuple[Path, Path],
                                                             tmp_path: Path, outside: Path) -> None:
    large, small = tiny_anchors
    tainted = tmp_path / "tainted"
    shutil.copytree(small, tainted)
    (tainted / "env.txt").symlink_to("/proc/self/environ")
    (tainted / "notes.md").symlink_to(outside / "secret.txt")
    body = assert_problem(client.post("/chains", json=registration(large, tainted)), 422, "env.txt", "notes.md")
    assert body["errors"][0]["field"] == "anchors.0.checkpoint"
    (tainted / "env.txt").unlink()
    (tainted / "notes.md").unlink()
    (tainted / "readme.md").symlink_to(small / "config.json")  # a link that stays inside the roots is fine
    assert client.post("/chains", json=registration(large, tainted)).status_code == 202


def test_a_link_planted_after_registration_fails_the_job_and_is_never_served(
        client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path], tmp_path: Path,
        outside: Path) -> None:
    large, small = tiny_anchors
    tainted = tmp_path / "tainted"
    shutil.copytree(small, tainted)
    response = client.post("/chains", json=registration(large, tainted))
    assert response.status_code == 202, response.text
    (tainted / "notes.md").symlink_to(outside / "secret.txt")  # between the API's check and the worker's copy
    assert run_pending(settings) == ["failed"]
    chain = client.get(f"/chains/{response.json()['id']}").json()
    assert "outside the server's allowed roots" in client.get(chain["job"]["url"]).json()["error"]
    assert client.get(f"/chains/{chain['id']}/anchors/1/files/notes.md").status_code == 404


# --- 2. dataset.hf ---------------------------------------------------------------------------------------------


def test_dataset_hf_naming_a_folder_outside_the_roots_is_422(client: TestClient, tiny_anchors: tuple[Path, Path],
                                                             tmp_path: Path, outside: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    large, small = tiny_anchors
    monkeypatch.chdir(tmp_path)  # `datasets` resolves relative folders against the working folder
    for hf in (f"../{outside.name}", str(outside), "/etc", "data/../../x"):
        response = client.post("/chains", json=registration(large, small, dataset={"hf": hf}))
        assert_problem(response, 422, "dataset.hf")
    monkeypatch.chdir(outside.parent)  # an id that happens to name a folder here is that folder to `datasets`
    assert_problem(client.post("/chains", json=registration(large, small, dataset={"hf": outside.name})), 422,
                   "dataset.hf", "allowed roots")
    accepted = client.post("/chains", json=registration(large, small, dataset={"hf": "tatsu-lab/alpaca"}))
    assert accepted.status_code == 202, accepted.text


def test_the_worker_checks_dataset_hf_against_its_own_working_folder(
        client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path], outside: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    large, small = tiny_anchors
    response = client.post("/chains", json=registration(large, small, dataset={"hf": f"{outside.name}/data"}))
    assert response.status_code == 202, response.text
    (outside / "data").mkdir()
    monkeypatch.chdir(outside.parent)  # the worker runs where that id is a folder outside the roots
    assert run_pending(settings) == ["failed"]
    assert "dataset.hf" in client.get(response.json()["job"]["url"]).json()["error"]


# --- 9. GGUF conversions --------------------------------------------------------------------------------------


def test_two_gguf_files_of_one_name_are_two_conversions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cbd_engine.io.gguf
    from worker.tasks import source_folder

    def fake_import(path: Path, target: Path) -> Path:  # the conversion records what it converted
        target.mkdir(parents=True)
        (target / "config.json").write_bytes(path.read_bytes())
        return target

    monkeypatch.setattr(cbd_engine.io.gguf, "import_gguf", fake_import)
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, content in ((first, b"GGUF one"), (second, b"GGUF two")):
        path.parent.mkdir()
        path.write_bytes(content)
    converted = [source_folder(str(path), make_settings(tmp_path)) for path in (first, second, first)]
    assert [(folder / "config.json").read_bytes() for folder in converted] == [b"GGUF one", b"GGUF two", b"GGUF one"]


# --- 8. bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1" * 400, "9" * 320 + "T", int("1" * 400), True, False])
def test_absurd_sizes_and_booleans_are_422_in_models_and_anchors(client: TestClient, tiny_anchors: tuple[Path, Path],
                                                                 size: object) -> None:
    large, _ = tiny_anchors
    body = assert_problem(client.post("/models", json={"source": "org/name", "size": size}), 422)
    assert body["errors"][0]["field"] == "size"
    assert body["detail"].startswith("size ") and "size: size" not in body["detail"]
    assert "Value error" not in body["detail"]
    anchors = client.post("/chains", json={"name": "t", "source": str(large), "anchors": [{"size": size}]})
    assert assert_problem(anchors, 422, "anchors.0.size")["errors"][0]["field"] == "anchors.0.size"


def test_a_name_too_long_for_the_file_system_is_422(client: TestClient, tiny_anchors: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    large, _ = tiny_anchors
    for name in ("a" * 300, "a" * 300 + ".gguf"):
        response = client.post("/chains", json=registration(large, tmp_path / name))
        assert_problem(response, 422, "anchors.0.checkpoint", "too long")


def test_a_streamed_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> object:  # no Content-Length: sent chunked
        for _ in range(3):
            yield b" " * (1 << 20)

    response = client.post("/models", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(response, 413, "exceeds")


# --- 5. Host header and proxy headers ---------------------------------------------------------------------------


def test_a_foreign_host_is_refused_when_auth_is_off(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, trusted_hosts=[])  # the default: loopback names only
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/healthz").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
        for host in ("rebind.attacker.example", "rebind.attacker.example:8000", "127.0.0.1.attacker.example",
                     "[::1", ""):
            assert_problem(client.get("/healthz", headers={"Host": host}), 400, "Host")
    with TestClient(create_app(make_settings(tmp_path, trusted_hosts=[], auth="on"))) as client:
        assert client.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200  # tokens guard it
    named = make_settings(tmp_path, trusted_hosts="models.example.com,*.internal.example", auth="on")
    with TestClient(create_app(named)) as client:
        assert client.get("/healthz", headers={"Host": "a.internal.example"}).status_code == 200
        assert_problem(client.get("/healthz", headers={"Host": "api.example.com"}), 400, "Host")


@contextlib.contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The app on a loopback socket, listening as `cbd serve` does."""
    server = uvicorn.Server(server_config(settings.model_copy(update={"port": 0}), create_app(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(5)


def statuses_with_forwarded_for(url: str) -> list[int]:
    return [httpx.get(f"{url}/chains", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(3)]


def test_forwarded_for_is_ignored_from_an_untrusted_peer(tmp_path: Path) -> None:
    with served(make_settings(tmp_path, rate_limit_per_minute=2)) as url:  # auth off: limited by client address
        assert statuses_with_forwarded_for(url) == [200, 200, 429]
    with served(make_settings(tmp_path, rate_limit_per_minute=2, trusted_proxies="127.0.0.1")) as url:
        assert statuses_with_forwarded_for(url) == [200, 200, 200]  # three clients behind a configured proxy


# --- 6. downloads -----------------------------------------------------------------------------------------------


def test_downloads_with_a_token_are_private_and_range_errors_are_problems(client: TestClient, settings: Settings,
                                                                          tiny_chain: dict) -> None:
    weights = next(f for f in make_model(client, settings, tiny_chain)["files"] if f["name"] == "model.safetensors")
    assert client.get(weights["url"]).headers["cache-control"] == "public, max-age=31536000, immutable"
    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as authed:
        with authed.app.state.session_factory() as session:
            token, _ = create_token(session, ["read"])
        for method in ("GET", "HEAD"):
            response = authed.request(method, weights["url"], headers={"Authorization": f"Bearer {token}"})
            assert response.headers["cache-control"] == "private, max-age=31536000, immutable", method
    beyond = client.get(weights["url"], headers={"Range": f"bytes={weights['size'] + 10}-"})
    assert_problem(beyond, 416, "Range")
    assert beyond.headers["content-range"] == f"bytes */{weights['size']}"
    assert_problem(client.get(weights["url"], headers={"Range": "bytes=9-2"}), 400, "Range")


# --- 7. secrets in logs -----------------------------------------------------------------------------------------

SECRET_URL = "postgresql+psycopg://cbd:hunter2@db.internal:5432/cbd"


def test_the_embedded_worker_logs_its_database_without_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    import worker.tasks
    from worker.embedded import serve_forever

    settings = Settings(data_dir=tmp_path, database_url=SECRET_URL)
    monkeypatch.setattr(worker.tasks, "warm_up", lambda: None)
    monkeypatch.setattr(worker.tasks, "runtime", lambda: (settings, None, None, "w1"))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    parents = iter([1, 2])  # orphaned at once: the loop ends before it polls
    monkeypatch.setattr(os, "getppid", lambda: next(parents))
    with caplog.at_level(logging.INFO, logger="cbd.worker"):
        serve_forever()
    assert "db.internal" in caplog.text and "hunter2" not in caplog.text


def test_log_lines_mask_passwords_in_urls_wherever_they_appear() -> None:
    try:
        raise ConnectionError(f"cannot reach {SECRET_URL} nor redis://:s3cret@redis:6379/0")
    except ConnectionError:
        record = logging.LogRecord("cbd.worker", logging.ERROR, __file__, 1, "broker %s down", ("redis://u:pw@r/0",),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    assert "hunter2" not in line and "s3cret" not in line and ":pw@" not in line
    assert "cbd:***@db.internal" in line and "redis://u:***@r/0" in line


# --- 3. deleting a model while another publishes the same blob ------------------------------------------------


@pytest.mark.parametrize(("moment", "move"), [("before the delete", True), ("inside the collector", False)],
                         ids=["moved-before", "copied-inside"])
def test_a_delete_racing_a_publish_leaves_the_other_model_whole(client: TestClient, settings: Settings,
                                                                tiny_chain: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, moment: str,
                                                                move: bool) -> None:
    model = make_model(client, settings, tiny_chain)
    weights = next(f for f in model["files"] if f["name"] == "model.safetensors")
    store = client.app.state.store
    published_long_ago = time.time() - 2 * settings.blob_grace_seconds
    os.utime(store.local_path(weights["sha256"]), (published_long_ago, published_long_ago))
    output = tmp_path / "other-model" / "model.safetensors"  # a worker's output with the same bytes
    output.parent.mkdir()
    shutil.copyfile(store.local_path(weights["sha256"]), output)
    os.utime(output, (published_long_ago, published_long_ago))  # materialized long before it is published

    def publish() -> None:  # the worker writes the blob now, and records its rows after the delete
        store.put_file(output, weights["sha256"] if move else None, move=move)

    if moment == "before the delete":
        publish()
    else:  # after the collector found no row naming the blob, before it removes it
        collect = store.collect

        def publish_then_collect(sha256: str, grace_seconds: float) -> None:
            if sha256 == weights["sha256"]:
                publish()
            collect(sha256, grace_seconds)

        monkeypatch.setattr(store, "collect", publish_then_collect)
    assert client.delete(f"/models/{model['id']}").status_code == 204
    with client.app.state.session_factory() as session:
        record_files(session, "mdl_other", [StoredFile("model.safetensors", weights["size"], weights["sha256"])])
        session.commit()
    assert sha256_file(store.local_path(weights["sha256"])) == weights["sha256"]


def test_blobs_no_row_names_are_collected_once_past_the_grace_period(client: TestClient, settings: Settings,
                                                                     tiny_chain: dict) -> None:
    from app.main import _collect_once

    model = make_model(client, settings, tiny_chain)
    weights = next(f for f in model["files"] if f["name"] == "model.safetensors")
    store = client.app.state.store
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert store.local_path(weights["sha256"]) is not None  # young: spared by the delete
    _collect_once(client.app)
    assert store.local_path(weights["sha256"]) is not None
    client.app.state.settings.blob_grace_seconds = 0.0
    _collect_once(client.app)  # the periodic sweep
    assert store.local_path(weights["sha256"]) is None
    assert all(store.local_path(f["sha256"]) for a in tiny_chain["anchors"] for f in a["files"])  # named: kept


# --- 4. webhooks ----------------------------------------------------------------------------------------------


class TricklingReceiver(socketserver.BaseRequestHandler):
    """Reads the request, then answers one byte every half second (for about 20 s)."""

    def handle(self) -> None:
        self.request.recv(1 << 16)
        with contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                self.request.sendall(bytes([byte]))
                time.sleep(0.5)


def test_a_trickling_webhook_receiver_does_not_delay_the_next_job(tmp_path: Path,
                                                                  tiny_anchors: tuple[Path, Path]) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), TricklingReceiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = make_settings(tmp_path, webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook",
                             webhook_timeout_seconds=2.0)
    large, small = tiny_anchors
    with TestClient(create_app(settings)) as client:
        jobs = [client.post("/chains", json=registration(large, small, name=name)).json()["job"]["url"]
                for name in ("first", "second")]
        assert run_pending(settings) == ["succeeded", "succeeded"]
        first, second = (client.get(url).json() for url in jobs)
    server.shutdown()
    finished = datetime.fromisoformat(first["finished_at"])
    assert (datetime.fromisoformat(second["started_at"]) - finished).total_seconds() < 1.0
    started = time.monotonic()
    thread = threading.Thread(target=deliver, args=(settings.webhook_url, "", [b"{}"], 2.0, {"job_id": "job_x"}))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 3.0  # given up at its deadline


# --- tokens -----------------------------------------------------------------------------------------------------


def test_a_revoked_token_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    from cbd_cli import main as cli

    monkeypatch.setenv("CBD_DATA_DIR", str(tmp_path / "data"))  # as --data-dir would, and restored afterwards
    assert cli(["token", "create", "--scopes", "read", "--name", "laptop"]) == 0
    token = capsys.readouterr().out.strip()
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", auth="on", token_cache_seconds=0))) as client:
        assert client.get("/models", headers=headers).status_code == 200
        assert cli(["token", "list"]) == 0
        listing = capsys.readouterr().out
        [(token_id, scopes, _, name)] = [line.split("\t") for line in listing.splitlines()]
        assert token_id.startswith("tok_") and scopes == "read" and name == "laptop" and token not in listing
        assert cli(["token", "revoke", token_id]) == 0
        assert_problem(client.get("/models", headers=headers), 401, "invalid bearer token")
        assert cli(["token", "revoke", token_id]) == 2  # no such token any more
        assert cli(["token", "list"]) == 0 and capsys.readouterr().out == ""


# --- the second pass: what the review read but did not run -------------------------------------------------------


def test_a_hub_source_is_fetched_without_the_workers_own_token_and_within_the_size_cap(
        live_server: tuple[str, Settings, str], tiny_anchors: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another factory (auth on) stands in for the Hub: the worker's HF_TOKEN reads it, and must not be sent."""
    from fnmatch import fnmatch

    from huggingface_hub import constants

    from cbd_client import Client
    from cbd_engine.io.sources import HUB_FILES
    from worker.tasks import source_folder

    url, settings, token = live_server
    large, small = tiny_anchors
    client = Client(url, token=token)
    chain = client.create_chain({"name": "t", "source": str(large),
                                 "anchors": [{"checkpoint": str(small), "distill": False}]})
    assert run_pending(settings) == ["succeeded"]
    params = [a["params"] for a in client.chain(chain["id"])["anchors"]]
    created = client.create_model(source=str(large), size=sum(params) // 2)
    assert run_pending(settings) == ["succeeded"]
    model = client.model(created["id"])
    monkeypatch.setenv("HF_TOKEN", token)  # the worker's own login
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "0")  # both restored after the test: `source_folder` sets them
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    worker = make_settings(tmp_path, hub_endpoint=url)
    with pytest.raises(Exception, match="401"):
        source_folder(model["hub_repo_id"], worker)
    fetched = [f for f in model["files"] if any(fnmatch(f["name"], p) for p in HUB_FILES)]  # weights, side files
    size = sum(f["size"] for f in fetched)
    with pytest.raises(ValueError, match="CBD_MAX_SOURCE_BYTES"):
        source_folder(model["hub_repo_id"], make_settings(tmp_path, hub_endpoint=url, hub_token=token,
                                                          max_source_bytes=size - 1))
    folder = source_folder(model["hub_repo_id"], make_settings(tmp_path, hub_endpoint=url, hub_token=token))
    assert {f["name"]: f["sha256"] for f in fetched} == {p.name: sha256_file(p) for p in folder.iterdir()}


def test_a_data_set_over_the_budget_or_with_a_link_outside_the_roots_is_422(
        client: TestClient, tiny_anchors: tuple[Path, Path], tmp_path: Path, outside: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    large, _ = tiny_anchors
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n' * 100)
    client.app.state.settings.max_dataset_bytes = rows.stat().st_size - 1
    body = {"name": "t", "source": str(large), "anchors": [{"size": 10000}], "device": "cpu"}
    assert_problem(client.post("/chains", json={**body, "dataset": {"path": str(rows)}}), 422,
                   "CBD_MAX_DATASET_BYTES")
    client.app.state.settings.max_dataset_bytes = 1 << 30
    folder = tmp_path / "hfdata"
    folder.mkdir()
    shutil.copyfile(rows, folder / "train.jsonl")
    (folder / "extra.csv").symlink_to(outside / "secret.txt")
    monkeypatch.chdir(tmp_path)  # `dataset.hf` names a folder relative to the server's working folder
    assert_problem(client.post("/chains", json={**body, "dataset": {"hf": "hfdata"}}), 422, "extra.csv")


def test_concurrent_re_requests_of_a_failed_model_queue_one_job(client: TestClient, settings: Settings,
                                                                 tiny_chain: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import func, select, update

    from app.models import Job, Model
    from app.schemas import ModelCreate
    from app.services import models

    model = make_model(client, settings, tiny_chain)
    factory = client.app.state.session_factory
    with factory() as session:
        session.execute(update(Model).where(Model.id == model["id"]).values(status="failed"))
        session.commit()
    both_read = threading.Barrier(2, timeout=30)  # each request has seen the failed model before either queues it
    check = models.jobs.check_capacity
    monkeypatch.setattr(models.jobs, "check_capacity", lambda *args: (both_read.wait(), check(*args)))
    results: list[tuple[str, bool]] = []

    def request() -> None:
        with factory() as session:
            made, started = models.request_model(session, settings, ModelCreate(chain=tiny_chain["id"],
                                                                                size=midpoint(tiny_chain)), "t")
            results.append((made.id, started))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [(model["id"], False), (model["id"], True)]
    with factory() as session:
        queued = select(func.count()).select_from(Job).where(Job.subject_id == model["id"], Job.status == "queued")
        assert session.scalar(queued) == 1


def test_a_chain_job_run_again_after_its_chain_is_ready_keeps_the_chain_and_its_models(
        client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    """The worker died between marking the chain ready and recording its job's end: the job runs again."""
    from sqlalchemy import update

    from app.models import Job

    model = make_model(client, settings, tiny_chain)
    with client.app.state.session_factory() as session:
        session.execute(update(Job).where(Job.id == tiny_chain["job"]["id"])
                        .values(status="running", lease_expires_at=None, finished_at=None))
        session.commit()
    assert run_pending(settings) == ["succeeded"]
    assert client.get(f"/chains/{tiny_chain['id']}").json()["anchors"] == tiny_chain["anchors"]
    assert client.get(f"/models/{model['id']}").json()["status"] == "ready"


def test_a_chain_is_deleted_by_an_admin_and_with_its_models_only_when_asked(client: TestClient, settings: Settings,
                                                                           tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain)
    assert_problem(client.delete(f"/chains/{tiny_chain['id']}"), 409, model["id"], "cascade=true")
    assert client.get(f"/models/{model['id']}").status_code == 200
    assert client.delete(f"/chains/{tiny_chain['id']}", params={"cascade": "true"}).status_code == 204
    assert client.get(f"/chains/{tiny_chain['id']}").status_code == 404
    assert client.get(f"/models/{model['id']}").status_code == 404
    assert_problem(client.delete(f"/chains/{tiny_chain['id']}"), 404)


def test_a_damaged_blob_fails_the_job_that_reads_it(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    weights = next(f for f in tiny_chain["anchors"][0]["files"] if f["name"] == "model.safetensors")
    blob = client.app.state.store.local_path(weights["sha256"])
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 0xFF
    blob.write_bytes(bytes(damaged))  # bit rot under the store's name for it
    response = client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)})
    assert response.status_code == 202
    assert run_pending(settings) == ["failed"]
    job = client.get(response.json()["job"]["url"]).json()
    assert weights["sha256"] in job["error"] and "damaged" in job["error"]
