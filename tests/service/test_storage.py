"""The local content-addressed store and the checks on what may be stored: safetensors headers, no pickles."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from app.storage import ArtifactError, LocalStore, model_files, validate_safetensors
from tests.service.conftest import run_pending


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_local_store_is_content_addressed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "a.json"
    source.write_text("{}")
    first, second = store.put_file(source), store.put_file(source)
    assert first == second and first.sha256 == hashlib.sha256(b"{}").hexdigest()
    assert store.local_path(first.sha256).read_text() == "{}"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # nothing left at a temporary key
    with pytest.raises(ArtifactError):
        store.put_file(source, "0" * 64)
    with pytest.raises(ArtifactError):
        store.local_path("../../etc/passwd")


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "does not fill"),
    ({"w": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap or leave gaps"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": "x"}}, b"", "data_offsets"),
])
def test_safetensors_headers_are_validated(tmp_path: Path, header: dict, data: bytes, message: str | None) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    if message is None:
        validate_safetensors(path)
    else:
        with pytest.raises(ArtifactError, match=message):
            validate_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ArtifactError, match="exceeds"):
        validate_safetensors(path)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ArtifactError, match="pickled"):
        model_files(tmp_path, [tmp_path])


def test_registering_a_checkpoint_with_a_pickle_fails_the_job(client: TestClient, settings: Settings,
                                                              tiny_anchors: tuple[Path, Path], tmp_path: Path) -> None:
    large, small = tiny_anchors
    tainted = tmp_path / "tainted"
    shutil.copytree(small, tainted)
    (tainted / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    chain = client.post("/chains", json={"name": "t", "source": str(large),
                                         "anchors": [{"checkpoint": str(tainted), "distill": False}]}).json()
    assert run_pending(settings) == ["failed"]
    job = client.get(chain["job"]["url"]).json()
    assert "pickled" in job["error"]
    assert client.get(f"/chains/{chain['id']}").json()["status"] == "failed"
