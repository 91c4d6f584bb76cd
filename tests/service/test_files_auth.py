"""Downloads (HEAD, Range, ETag, 304, traversal), the Hub-compatible routes with huggingface_hub, and auth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import create_token, hash_token
from app.main import create_app
from app.settings import Settings
from tests.service.conftest import make_settings, run_pending
from tests.service.test_api import assert_problem, make_model


@pytest.fixture
def model(client: TestClient, settings: Settings, tiny_chain: dict) -> dict:
    return make_model(client, settings, tiny_chain)


def weights_of(model: dict) -> dict:
    return next(f for f in model["files"] if f["name"] == "model.safetensors")


def test_head_range_etag(client: TestClient, model: dict) -> None:
    weights = weights_of(model)
    head = client.head(weights["url"])
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == f'"{weights["sha256"]}"' == head.headers["x-linked-etag"]
    assert int(head.headers["content-length"]) == weights["size"] == int(head.headers["x-linked-size"])
    full = client.get(weights["url"])
    assert hashlib.sha256(full.content).hexdigest() == weights["sha256"]
    part = client.get(weights["url"], headers={"Range": "bytes=8-99"})
    assert part.status_code == 206 and part.content == full.content[8:100]
    assert part.headers["content-range"] == f"bytes 8-99/{weights['size']}"
    cached = client.get(weights["url"], headers={"If-None-Match": head.headers["etag"]})
    assert cached.status_code == 304 and cached.content == b""
    assert client.get(weights["url"], headers={"If-None-Match": '"other"'}).status_code == 200


TRICKY_NAMES = ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2fconfig.json", "config.json%00",
                "sub%2Fconfig.json", "%2E%2E", "%5c..%5cconfig.json", "model.safetensors%2F", "CONFIG.JSON",
                "%2Fetc%2Fpasswd", "config.json%2F..%2Fmodel.safetensors", ".cbd-sha256.json"]


def test_traversal_and_encoded_names_are_404(client: TestClient, model: dict, tiny_chain: dict) -> None:
    for name in TRICKY_NAMES:
        for path in (f"/models/{model['id']}/files/{name}", f"/cbd/{model['id']}/resolve/main/{name}",
                     f"/chains/{tiny_chain['id']}/anchors/0/files/{name}"):
            response = client.get(path)
            assert response.status_code == 404, (path, response.status_code)
            assert response.headers["content-type"].startswith("application/problem+json")


def test_hub_routes(client: TestClient, model: dict) -> None:
    info = client.get(f"/api/models/cbd/{model['id']}").json()
    assert info["id"] == f"cbd/{model['id']}" and len(info["sha"]) == 40
    assert {s["rfilename"] for s in info["siblings"]} == {f["name"] for f in model["files"]}
    assert client.get(f"/api/models/cbd/{model['id']}/revision/{info['sha']}").json()["sha"] == info["sha"]
    assert_problem(client.get(f"/api/models/cbd/{model['id']}/revision/v2"), 404, "revision")
    tree = client.get(f"/api/models/cbd/{model['id']}/tree/main", params={"recursive": "true"}).json()
    assert {e["path"]: e["lfs"]["oid"] for e in tree} == {f["name"]: f["sha256"] for f in model["files"]}
    paged = client.get(f"/api/models/cbd/{model['id']}/tree/main", params={"limit": 1})
    assert len(paged.json()) == 1 and 'rel="next"' in paged.headers["link"]
    head = client.head(f"/cbd/{model['id']}/resolve/main/model.safetensors")
    assert head.headers["x-repo-commit"] == info["sha"]
    assert head.headers["x-linked-etag"] == f'"{weights_of(model)["sha256"]}"'


def test_client_and_snapshot_download_fetch_a_model_unchanged(live_server: tuple[str, Settings, str],
                                                     tiny_anchors: tuple[Path, Path], tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    from cbd_client import ApiError, Client

    url, settings, token = live_server
    large, small = tiny_anchors
    client = Client(url, token=token)
    chain = client.create_chain({"name": "t", "source": str(large),
                                 "anchors": [{"checkpoint": str(small), "distill": False}]})
    assert run_pending(settings) == ["succeeded"]
    assert client.wait(chain["job"]["id"])["status"] == "succeeded"
    params = [a["params"] for a in client.chain(chain["id"])["anchors"]]
    created = client.create_model(source=str(large), size=sum(params) // 2)
    assert run_pending(settings) == ["succeeded"]
    model = client.materialize(source=str(large), size=sum(params) // 2)  # identical: the same model, at once
    assert model["id"] == created["id"]
    with pytest.raises(ApiError) as error:
        Client(url, token="wrong").model(model["id"])
    assert error.value.status == 401
    downloaded = client.download(model["id"], tmp_path / "client")
    folder = Path(snapshot_download(repo_id=model["hub_repo_id"], endpoint=url, token=token,
                                    cache_dir=tmp_path / "hf-cache"))
    for item in model["files"]:
        assert hashlib.sha256((folder / item["name"]).read_bytes()).hexdigest() == item["sha256"]
        assert (downloaded / item["name"]).read_bytes() == (folder / item["name"]).read_bytes()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() == model["params"]


def test_auth_scopes(tmp_path: Path) -> None:
    reader_hash = hash_token("reader-secret")
    settings = make_settings(tmp_path, auth="on", token_hashes=f"{reader_hash}:read")
    with TestClient(create_app(settings)) as client:
        with client.app.state.session_factory() as session:
            builder, _ = create_token(session, ["read", "build"])
            admin, _ = create_token(session, ["admin"])
        body = {"source": "org/x", "size": "1M"}
        assert_problem(client.get("/models"), 401, "missing")
        assert client.get("/models").headers["www-authenticate"].startswith("Bearer")
        assert_problem(client.get("/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid")
        assert_problem(client.get("/models", headers={"Authorization": "Basic abc"}), 401)
        reader = {"Authorization": "Bearer reader-secret"}
        assert client.get("/models", headers=reader).status_code == 200
        assert_problem(client.post("/models", json=body, headers=reader), 403, "build")
        build = {"Authorization": f"Bearer {builder}"}
        assert_problem(client.post("/models", json=body, headers=build), 422, "no ready chain")
        assert_problem(client.delete("/models/x", headers=build), 403, "admin")
        assert_problem(client.delete("/models/x", headers={"Authorization": f"Bearer {admin}"}), 404)
        assert client.get("/healthz").status_code == 200  # operations stay open


def test_rate_limit(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, rate_limit_per_minute=3))) as client:
        codes = [client.get("/jobs").status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert int(client.get("/jobs").headers["retry-after"]) >= 1


@pytest.mark.integration
def test_rate_limit_is_shared_through_redis_by_api_processes_with_a_redis_broker(tmp_path: Path) -> None:
    """Two API processes (two apps) with the same Redis broker share each client's window."""
    import redis

    from tests.service.conftest import REDIS_URL, require_service

    require_service("Redis", 6379)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(broker).flushdb()
    settings = make_settings(tmp_path, rate_limit_per_minute=3, broker_url=broker)
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        codes = [client.get("/jobs").status_code for client in (first, second, first, second, first)]
        assert codes == [200, 200, 200, 429, 429]
        assert 1 <= int(second.get("/jobs").headers["retry-after"]) <= 60
    assert redis.Redis.from_url(broker).zcard("cbd:rate:ip:testclient") == 3


def test_rate_limit_lets_requests_through_when_redis_is_unreachable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rate_limit_per_minute=1, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        assert [client.get("/jobs").status_code for _ in range(3)] == [200, 200, 200]


def test_token_create_cli_prints_a_working_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cbd_cli", "token", "create", "--scopes", "read,build",
                             "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, check=True)
    token = result.stdout.strip()
    assert token.startswith("cbd_") and token not in result.stderr
    settings = Settings(data_dir=tmp_path / "data", auth="on")
    with TestClient(create_app(settings)) as client:
        assert client.get("/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert_problem(client.delete("/models/x", headers={"Authorization": f"Bearer {token}"}), 403)
