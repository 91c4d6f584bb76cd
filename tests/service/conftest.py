"""Fixtures of the service tests: settings on a fresh SQLite (or PostgreSQL) database, an API client, tiny chains."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.auth import create_token
from app.db import upgrade_database
from app.main import create_app
from app.services.webhooks import sign
from app.settings import Settings
from tests.conftest import SHARED_DATA, make_tiny_model

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
DOLLY = SHARED_DATA / "instruction" / "minillm_dolly_dev.jsonl"


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_service(name: str, port: int) -> None:
    """Integration tests fail on CI when a service is down, and skip elsewhere."""
    if reachable(port):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not reachable on 127.0.0.1:{port} (required on CI)")
    pytest.skip(f"{name} is not reachable on 127.0.0.1:{port}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema of the `test` database, dropped afterwards."""
    require_service("PostgreSQL", 5432)
    schema = f"cbd_{uuid.uuid4().hex[:10]}"
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with engine.connect() as connection:
        # a transaction the test left open would block the drop for ever: fail instead
        connection.execute(text("SET lock_timeout = '60s'"))
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    # TestClient's Host is "testserver"; live servers are reached at 127.0.0.1
    values = {"data_dir": tmp_path / "data", "allowed_source_roots": [tmp_path, SHARED_DATA], "auth": "off",
              "trusted_hosts": ["testserver", "127.0.0.1"],
              "lease_seconds": 5.0, "heartbeat_seconds": 0.5, "validation_rows": 4, **overrides}
    settings = Settings(**values)
    upgrade_database(settings.resolved_database_url)
    return settings


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "postgresql":
        return make_settings(tmp_path, database_url=request.getfixturevalue("postgres_url"))
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def tiny_anchors(tmp_path: Path) -> tuple[Path, Path]:
    """Two llama checkpoints of one chain (same vocabulary and head_dim), large and small."""
    large = make_tiny_model(tmp_path / "large", "llama", seed=1)
    small = make_tiny_model(tmp_path / "small", "llama", seed=2, hidden_size=48, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    return large, small


def run_pending(settings: Settings) -> list[str]:
    """Run every claimable job with the worker's task code, in this process; returns their final statuses."""
    from app.db import make_engine, make_session_factory
    from worker.runner import claimable_jobs, run_job, worker_identity
    from worker.tasks import HANDLERS

    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    statuses = []
    with factory() as session:
        pending = claimable_jobs(session)
    for job_id in pending:
        statuses.append(run_job(job_id, settings, factory, HANDLERS, worker_identity()))
    engine.dispose()
    return statuses


@pytest.fixture
def tiny_chain(client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path]) -> dict:
    """A ready chain registered from the tiny anchors (distill: false), as GET /chains/{id} returns it."""
    large, small = tiny_anchors
    body = {"name": "tiny", "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "device": "cpu"}
    response = client.post("/chains", json=body)
    assert response.status_code == 202, response.text
    assert run_pending(settings) == ["succeeded"]
    return client.get(f"/chains/{response.json()['id']}").json()


@pytest.fixture
def live_server(tmp_path: Path, tiny_anchors: tuple[Path, Path]) -> tuple[str, Settings, str]:
    """The app on a real socket with auth on (huggingface_hub needs an endpoint), and a read token."""
    settings = make_settings(tmp_path, auth="on")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    with app.state.session_factory() as session:
        token, _ = create_token(session, ["read", "build"])
    yield f"http://127.0.0.1:{port}", settings, token
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[tuple[dict, bytes]]]]:
    """(its URL, what it received): an HTTP server that keeps the headers and body of every POST and answers 204."""
    received: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def signed_events(received: list[tuple[dict, bytes]], secret: str, count: int, timeout: float = 10.0) -> list[dict]:
    """The events received once there are `count` (webhooks are sent from threads of their own), each body checked
    against its signature."""
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    events = []
    for headers, body in received:
        assert headers["X-CBD-Signature"] == sign(secret, headers["X-CBD-Timestamp"], body)
        events.append(json.loads(body))
    return events
