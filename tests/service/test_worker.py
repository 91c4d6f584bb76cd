"""The jobs table as the source of truth: leases, single-run claims, recovery of a dead worker's job, cancellation,
and the Celery path through a real Redis broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db import make_engine, make_session_factory
from app.models import Job
from app.settings import Settings
from cbd_engine.spec.progress import Cancelled, ProgressEvent
from tests.service.conftest import REDIS_URL, require_service
from tests.service.test_api import midpoint
from worker.runner import EXIT_HARD_TIME_LIMIT, JobContext, LeaseLost, claim, run_job


@pytest.fixture
def factory(settings: Settings):  # noqa: ANN201
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def queued_job(client: TestClient, tiny_chain: dict) -> str:
    return client.post("/models", json={"chain": tiny_chain["id"], "size": midpoint(tiny_chain)}).json()["job"]["id"]


def test_only_one_of_many_concurrent_claims_wins(factory, queued_job: str) -> None:  # noqa: ANN001
    def try_claim(n: int) -> bool:
        with factory() as session:
            return claim(session, queued_job, f"w{n}", 30)

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(try_claim, range(8))) == 1


def test_live_lease_is_kept_and_expired_lease_is_taken_over(factory, settings: Settings, queued_job: str) -> None:  # noqa: ANN001
    with factory() as session:
        assert claim(session, queued_job, "dead-worker", 0.3)
        assert not claim(session, queued_job, "other", 30)  # a live lease is never taken over
    time.sleep(0.5)
    with factory() as session:
        assert claim(session, queued_job, "rescuer", 30)
        job = session.get(Job, queued_job)
        assert job.attempts == 2 and job.worker_id == "rescuer"
    # the first worker, back from the dead, can no longer write anything
    ctx = JobContext(queued_job, "materialize_model", "cpu", "", {}, settings, factory, "dead-worker",
                     time.monotonic() + 60)
    with factory() as session, pytest.raises(LeaseLost):
        ctx.commit(session)


def test_dead_workers_job_finishes_once_when_picked_up_again(factory, settings: Settings, client: TestClient,  # noqa: ANN001
                                                              queued_job: str) -> None:
    from worker.tasks import HANDLERS

    with factory() as session:
        assert claim(session, queued_job, "killed-worker", 1.0)  # a worker took it and died without a heartbeat
    assert run_job(queued_job, settings, factory, HANDLERS, "w2") == "skipped"  # its lease still runs
    time.sleep(1.1)
    assert run_job(queued_job, settings, factory, HANDLERS, "w2") == "succeeded"
    assert run_job(queued_job, settings, factory, HANDLERS, "w3") == "skipped"  # never twice
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2
    model = client.get(f"/models/{job['result']['model']}").json()
    assert model["status"] == "ready" and len({f["name"] for f in model["files"]}) == len(model["files"])


def test_cooperative_cancellation_of_a_running_job(factory, settings: Settings, client: TestClient,  # noqa: ANN001
                                                   queued_job: str) -> None:
    """A handler that checks should_stop at each step stops after POST /jobs/{id}/cancel, and the job ends cancelled."""
    started = threading.Event()

    def slow(ctx: JobContext) -> None:
        for step in range(200):
            ctx.progress(ProgressEvent("work", step, 200), force=True)
            started.set()
            if ctx.should_stop():
                raise Cancelled()
            time.sleep(0.05)

    worker = threading.Thread(target=run_job, args=(queued_job, settings, factory, {"materialize_model": slow}, "w"))
    worker.start()
    assert started.wait(10)
    assert client.get(f"/jobs/{queued_job}").json()["progress"]["stage"] == "work"
    assert client.post(f"/jobs/{queued_job}/cancel").status_code == 202
    worker.join(15)
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 199
    assert client.get(f"/models/{job['result']['model']}").json()["status"] == "cancelled"


def test_soft_time_limit_stops_a_job_at_its_next_check(factory, settings: Settings, client: TestClient,  # noqa: ANN001
                                                       queued_job: str) -> None:
    def slow(ctx: JobContext) -> None:
        while not ctx.should_stop():
            time.sleep(0.02)

    limited = settings.model_copy(update={"soft_time_limit_seconds": 0.3})
    assert run_job(queued_job, limited, factory, {"materialize_model": slow}, "w") == "failed"
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["error"].startswith("TimeLimitExceeded: job exceeded its soft time limit")
    assert client.get(f"/models/{job['result']['model']}").json()["status"] == "failed"


STUCK_WORKER = """
import sys
from app.db import make_engine, make_session_factory
from app.settings import Settings
from tests.service.handlers_celery_app import stuck  # never reaches a should_stop check
from worker.runner import run_job

settings = Settings()
run_job(sys.argv[1], settings, make_session_factory(make_engine(settings.resolved_database_url)),
        {"materialize_model": stuck}, "stuck-worker")
"""


def test_hard_time_limit_fails_the_job_and_ends_a_stuck_worker_process(settings: Settings, client: TestClient,
                                                                       queued_job: str) -> None:
    env = {**os.environ, "CBD_DATABASE_URL": settings.resolved_database_url, "CBD_DATA_DIR": str(settings.data_dir),
           "CBD_HEARTBEAT_SECONDS": "0.5", "CBD_SOFT_TIME_LIMIT_SECONDS": "0.5", "CBD_HARD_TIME_LIMIT_SECONDS": "2"}
    worker = subprocess.run([sys.executable, "-c", STUCK_WORKER, queued_job], env=env, timeout=120,
                            capture_output=True, text=True)
    assert worker.returncode == EXIT_HARD_TIME_LIMIT, worker.stderr
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["status"] == "failed" and job["progress"]["stage"] == "failed"
    assert job["error"].startswith("TimeLimitExceeded: job exceeded its hard time limit of 2 s")
    assert client.get(f"/models/{job['result']['model']}").json()["status"] == "failed"


def test_a_job_whose_workers_keep_dying_fails_instead_of_running_again(factory, settings: Settings,  # noqa: ANN001
                                                                       client: TestClient, queued_job: str) -> None:
    from worker.tasks import HANDLERS

    for crash in range(3):  # three workers take the job and die (out of memory, say) without finishing it
        with factory() as session:
            assert claim(session, queued_job, f"crashed-{crash}", 0.2)
        time.sleep(0.3)
    assert run_job(queued_job, settings, factory, HANDLERS, "w") == "failed"
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["status"] == "failed" and job["attempts"] == 3 and job["error"].startswith("WorkerLost:")
    assert client.get(f"/models/{job['result']['model']}").json()["status"] == "failed"
    with factory() as session:
        assert not claim(session, queued_job, "late", 30)  # it stays failed


def test_a_failed_materialization_leaves_no_work_files(settings: Settings, client: TestClient, queued_job: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import cbd_engine.materialization.recipe
    from tests.service.conftest import run_pending

    def half_written(out: Path, **kwargs: object) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(cbd_engine.materialization.recipe, "materialize", half_written)
    assert run_pending(settings) == ["failed"]
    job = client.get(f"/jobs/{queued_job}").json()
    assert job["error"] == "OSError: No space left on device"
    assert client.get(f"/models/{job['result']['model']}").json()["status"] == "failed"
    assert list((settings.work_dir / "models").iterdir()) == []


def test_embedded_lanes_name_every_job_kind_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("CBD_EMBEDDED_LANES", "build_chain ; materialize_model, evaluate_model ; export_model")
    assert Settings().embedded_lanes == [("build_chain",), ("materialize_model", "evaluate_model"), ("export_model",)]
    for wrong in ("build_chain;materialize_model,evaluate_model",  # exports would never run
                  "build_chain;materialize_model,evaluate_model,export_model;build_chain", "distill;build_chain"):
        with pytest.raises(ValidationError, match="each job kind once"):
            Settings(embedded_lanes=wrong)


@pytest.mark.integration
def test_celery_worker_runs_jobs_from_redis(tmp_path, tiny_anchors, postgres_url: str) -> None:  # noqa: ANN001
    """Production topology: PostgreSQL, Redis, and a real `cbd worker` process consuming the cpu queue."""
    import redis

    from app.main import create_app
    from tests.service.conftest import make_settings

    require_service("Redis", 6379)
    db = 15
    broker = REDIS_URL.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(broker).flushdb()
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=broker)
    env = worker_env(settings, CBD_LEASE_SECONDS="5", CBD_HEARTBEAT_SECONDS="1")
    worker = worker_process(env, "cbd_cli", "worker", "--queue", "cpu")
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"]["broker"] == "ok"
            chain, size = chain_built_by_worker(client, tiny_anchors)
            model = client.post("/models", json={"chain": chain, "size": size}).json()
            assert wait_job(client, model["job"]["id"]) == "succeeded"
            assert client.get(f"/models/{model['id']}").json()["status"] == "ready"
    finally:
        end_process(worker)


@pytest.mark.integration
def test_celery_child_stuck_past_the_hard_limit_fails_its_job_and_is_replaced(tmp_path, tiny_anchors,  # noqa: ANN001
                                                                             postgres_url: str) -> None:
    import redis

    from app.main import create_app
    from tests.service.conftest import make_settings

    require_service("Redis", 6379)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(broker).flushdb()
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=broker)
    env = worker_env(settings, CBD_HEARTBEAT_SECONDS="0.5", CBD_HARD_TIME_LIMIT_SECONDS="3")
    worker = handlers_worker(env)
    try:
        with TestClient(create_app(settings)) as client:
            chain, size = chain_built_by_worker(client, tiny_anchors)
            stuck = client.post("/models", json={"chain": chain, "size": size}).json()
            assert wait_job(client, stuck["job"]["id"]) == "failed"
            job = client.get(f"/jobs/{stuck['job']['id']}").json()
            assert job["error"].startswith("TimeLimitExceeded: job exceeded its hard time limit of 3 s")
            # the pool replaced its ended child: the next job runs (and hits the limit in its turn)
            after = client.post("/models", json={"chain": chain, "size": size - 1}).json()
            assert wait_job(client, after["job"]["id"]) == "failed"
            assert worker.poll() is None
            # the first job's message, redelivered after its child was lost, did not run it again
            assert client.get(f"/jobs/{stuck['job']['id']}").json()["attempts"] == 1
    finally:
        end_process(worker)
        redis.Redis.from_url(broker).flushdb()


@pytest.mark.integration
def test_celery_worker_stopped_warm_gives_its_job_to_the_next_worker(tmp_path, tiny_anchors,  # noqa: ANN001
                                                                    postgres_url: str) -> None:
    """SIGTERM (`docker compose stop`, a rolling deploy) stops the running job at its next step instead of waiting
    it out; the job goes back to the queue without counting an attempt, and the next worker runs it."""
    import signal

    import redis

    from app.main import create_app
    from tests.service.conftest import make_settings

    require_service("Redis", 6379)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(broker).flushdb()
    # the API's sweeper runs every 60 s: the job given back must be sent again by its worker, not by the sweeper
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=broker, lease_seconds=120.0)
    env = worker_env(settings, CBD_HEARTBEAT_SECONDS="0.5", CBD_TEST_MATERIALIZE="slow")
    first = handlers_worker(env)
    workers = [first]
    try:
        with TestClient(create_app(settings)) as client:
            chain, size = chain_built_by_worker(client, tiny_anchors)
            job_id = client.post("/models", json={"chain": chain, "size": size}).json()["job"]["id"]
            deadline = time.monotonic() + 60
            while client.get(f"/jobs/{job_id}").json()["status"] != "running":
                assert time.monotonic() < deadline, "the slow job never started"
                time.sleep(0.2)
            first.send_signal(signal.SIGTERM)
            assert first.wait(30) == 0  # the warm shutdown did not wait for the job
            job = client.get(f"/jobs/{job_id}").json()
            assert job["status"] == "queued" and job["attempts"] == 0
            # the next worker (the real handlers) gets the job's new message and runs it
            workers.append(worker_process(env, "cbd_cli", "worker", "--queue", "cpu"))
            assert wait_job(client, job_id, timeout=50) == "succeeded"
            assert client.get(f"/jobs/{job_id}").json()["attempts"] == 1
    finally:
        for worker in workers:
            end_process(worker)
        redis.Redis.from_url(broker).flushdb()


def worker_env(settings: Settings, **variables: str) -> dict[str, str]:
    """The environment of a worker process of these settings: its database, broker, data folder, and the allowed
    roots (a worker resolves a chain's references again)."""
    return {**os.environ, "CBD_DATA_DIR": str(settings.data_dir), "CBD_DATABASE_URL": settings.resolved_database_url,
            "CBD_BROKER_URL": settings.broker_url,
            "CBD_ALLOWED_SOURCE_ROOTS": os.pathsep.join(map(str, settings.allowed_source_roots)), **variables}


def worker_process(env: dict[str, str], *module_and_args: str) -> subprocess.Popen:
    """`python -m MODULE ARGS` with this environment, its output discarded."""
    return subprocess.Popen([sys.executable, "-m", *module_and_args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def handlers_worker(env: dict[str, str]) -> subprocess.Popen:
    """A Celery worker of tests.service.handlers_celery_app (materialize stuck or slow) on the cpu queue."""
    return worker_process(env, "celery", "-A", "tests.service.handlers_celery_app", "worker", "-Q", "cpu",
                          "--concurrency", "1")


def chain_built_by_worker(client: TestClient, tiny_anchors: tuple[Path, Path]) -> tuple[str, int]:
    """A chain of the tiny anchors, built by the worker under test: its id and the size halfway between its anchors."""
    large, small = tiny_anchors
    chain = client.post("/chains", json={"name": "r", "source": str(large), "device": "cpu",
                                         "anchors": [{"checkpoint": str(small), "distill": False}]}).json()
    assert wait_job(client, chain["job"]["id"]) == "succeeded"
    return chain["id"], midpoint(client.get(f"/chains/{chain['id']}").json())


def end_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 20 s: a failed test leaves no worker behind."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_job(client: TestClient, job_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").json()["status"]
        if status in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_signed_webhooks_on_success_and_failure(tmp_path, tiny_anchors, webhook_receiver) -> None:  # noqa: ANN001
    from app.main import create_app
    from app.services.webhooks import sign
    from tests.service.conftest import make_settings, run_pending, signed_events

    url, received = webhook_receiver
    settings = make_settings(tmp_path, webhook_url=url, webhook_secret="s3cret")
    large, small = tiny_anchors
    with TestClient(create_app(settings)) as client:
        client.post("/chains", json={"name": "ok", "source": str(large),
                                     "anchors": [{"checkpoint": str(small), "distill": False}]})
        client.post("/chains", json={"name": "bad", "source": str(small),  # ascending sizes: the job fails
                                     "anchors": [{"checkpoint": str(large), "distill": False}]})
        assert sorted(run_pending(settings)) == ["failed", "succeeded"]
    events = [event["event"] for event in signed_events(received, "s3cret", 2)]
    assert sorted(events) == ["job.failed", "job.succeeded"]
    assert sign("other", "1", b"x") != sign("s3cret", "1", b"x")


@pytest.mark.integration
def test_sweeper_resends_jobs_whose_lease_expired(tmp_path, tiny_anchors, postgres_url: str) -> None:  # noqa: ANN001
    """With a broker, the API re-sends a job whose worker stopped heartbeating, to the job's own queue."""
    import redis

    from app.main import create_app
    from app.services.jobs import requeue_expired
    from tests.service.conftest import make_settings

    require_service("Redis", 6379)
    broker = REDIS_URL.rsplit("/", 1)[0] + "/14"
    queue = redis.Redis.from_url(broker)
    queue.flushdb()
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=broker)
    large, small = tiny_anchors
    with TestClient(create_app(settings)) as client:
        anchors = [{"checkpoint": str(small), "distill": False}]
        body = {"name": "s", "source": str(large), "device": "gpu", "anchors": anchors}
        job_id = client.post("/chains", json=body).json()["job"]["id"]
        assert queue.llen("gpu") == 1
        factory = client.app.state.session_factory
        with factory() as session:
            assert claim(session, job_id, "dead-worker", 1.0)
            assert requeue_expired(session, settings) == []  # the lease still runs
        time.sleep(1.2)
        with factory() as session:
            assert requeue_expired(session, settings) == [job_id]
        assert queue.llen("gpu") == 2
    # a broker that is down when a job is created: the request still succeeds, and the sweeper sends the job later
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(down)) as client:
        response = client.post("/chains", json={"name": "late", "source": str(large), "device": "gpu",
                                                "anchors": [{"checkpoint": str(small), "distill": False}]})
        assert response.status_code == 202
        assert client.get("/readyz").status_code == 503
        late = response.json()["job"]["id"]
        with client.app.state.session_factory() as session:
            assert session.get(Job, late).dispatched_at is None
            first = requeue_expired(session, settings)  # also the dead worker's job again: its lease is still out
            second = requeue_expired(session, settings)
    assert late in first and late not in second  # sent once
    assert queue.llen("gpu") == 2 + len(first) + len(second)
    queue.flushdb()


def test_api_shutdown_finishes_a_sweep_under_way_and_leaves_no_transaction_open(  # noqa: ANN201
        settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """A sweep cancelled half-way used to go on in its thread after the engine was disposed, leaving a transaction
    open whose locks blocked every later schema change (it hung CI's PostgreSQL teardown)."""
    import app.main
    from app.main import create_app
    from app.services.jobs import requeue_expired

    started, finished = threading.Event(), threading.Event()
    sessions = []

    def slow_sweep(session, settings):  # noqa: ANN001, ANN202
        started.set()
        time.sleep(0.5)  # the API shuts down meanwhile
        sessions.append(session)
        requeue_expired(session, settings)
        finished.set()

    monkeypatch.setattr(app.main, "requeue_expired", slow_sweep)
    with_broker = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0", "lease_seconds": 0.1})
    with TestClient(create_app(with_broker)):
        assert started.wait(10)
    assert finished.is_set()  # shutdown waited for the sweep
    assert not sessions[0].in_transaction()  # and the sweep closed its session


def test_shutdown_gives_a_running_job_back_at_once(factory, settings: Settings, client: TestClient,  # noqa: ANN001
                                                   queued_job: str) -> None:
    from worker.runner import SHUTDOWN
    from worker.tasks import HANDLERS

    started = threading.Event()

    def slow(ctx: JobContext) -> None:
        while True:
            started.set()
            if ctx.should_stop():
                raise Cancelled()
            time.sleep(0.02)

    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(
        run_job(queued_job, settings, factory, {"materialize_model": slow}, "stopping-worker")))
    worker.start()
    assert started.wait(10)
    SHUTDOWN.set()
    try:
        worker.join(10)
    finally:
        SHUTDOWN.clear()
    assert outcome == ["released"]
    assert client.get(f"/jobs/{queued_job}").json()["status"] == "queued"
    assert run_job(queued_job, settings, factory, HANDLERS, "next-worker") == "succeeded"  # no lease to wait out
    assert client.get(f"/jobs/{queued_job}").json()["attempts"] == 1  # the run handed back is not counted
