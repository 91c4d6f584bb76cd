"""The materialize job on tiny chains: per-stage progress, quality metrics, flags and samples, heal steps (resumed
after a hand-back, nothing half-written when cancelled), and the calibration every registered anchor records."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import make_engine, make_session_factory
from app.models import Job
from app.settings import Settings
from cbd_engine.data.calibration import FILE_NAME
from cbd_engine.spec.progress import ProgressEvent
from tests.service.conftest import DOLLY, run_pending
from tests.service.test_api import midpoint
from worker.runner import SHUTDOWN, JobContext

# small windows and batches: heal steps of the tiny models take milliseconds
QUICK = {"batch_size": 2, "max_length": 64}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importance and dev losses are cached by anchor: a fresh cache shows every stage."""
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))


def register(client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path], **extra: object) -> dict:
    large, small = tiny_anchors
    body = {"name": "tiny", "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "device": "cpu", **extra}
    response = client.post("/chains", json=body)
    assert response.status_code == 202, response.text
    assert run_pending(settings) == ["succeeded"]
    return client.get(f"/chains/{response.json()['id']}").json()


Event = tuple[str, int, float | None, str]  # stage, step, eta, the job's status when it was reported


@pytest.fixture
def progress_events(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """Every progress event the worker reports, with the job's status in the database right after it."""
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    events: list[Event] = []
    report = JobContext.progress

    def recorded(ctx: JobContext, event: ProgressEvent, force: bool = False) -> None:
        report(ctx, event, force)
        with factory() as session:
            events.append((event.stage, event.step, event.eta_seconds,
                           session.scalar(select(Job.status).where(Job.id == ctx.job_id))))
        for hook in HOOKS:
            hook(ctx, event)

    HOOKS.clear()
    monkeypatch.setattr(JobContext, "progress", recorded)
    yield events
    HOOKS.clear()
    engine.dispose()


HOOKS: list[Callable[[JobContext, ProgressEvent], None]] = []  # run after each recorded event


def stages(events: list[Event]) -> list[str]:
    return [stage for i, (stage, *_) in enumerate(events) if i == 0 or events[i - 1][0] != stage]


def test_a_materialization_reports_each_stage_and_the_models_quality(client: TestClient, settings: Settings,
                                                                      tiny_anchors: tuple[Path, Path],
                                                                      progress_events: list[Event]) -> None:
    chain = register(client, settings, tiny_anchors, dataset={"path": str(DOLLY)})
    progress_events.clear()
    created = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), "dtype": "float32"})
    assert run_pending(settings) == ["succeeded"]
    reported = stages(progress_events)  # a pair's first auto model plans and searches the knots beside its size
    knots = (len(reported) - 5) // 2
    assert knots in (1, 2) and reported == ["starting", *["importance", "alpha search"] * knots, "materialize",
                                            "publish", "validation", "samples"]
    validation = [event for event in progress_events if event[0] == "validation"]
    assert validation[0][1] == 0 and validation[-1][1] == settings.validation_rows  # row by row
    assert {status for *_, status in validation} == {"running"}  # reported while the job runs

    model = client.get(f"/models/{created.json()['id']}").json()
    metrics = model["metrics"]
    assert model["alpha"] == metrics["alphas"]["mlp"] and model["alpha_request"] == "auto"
    assert metrics["dev_loss"] <= metrics["alpha_0_dev_loss"]  # auto, scored, never loses to alpha 0
    assert set(metrics["anchors_dev_loss"]) == set(metrics["anchors_validation_loss"]) == \
        {a["id"] for a in chain["anchors"]}
    assert metrics["validation_loss"] > 0 and "heal" not in metrics
    uniform = math.log(model["shape"]["vocab_size"])
    assert metrics["flags"] == {"worse_than_alpha_0": False,
                                "worse_than_uniform": metrics["validation_loss"] > uniform}
    assert [s["prompt"] for s in metrics["samples"]] == ["What is the capital of France?",
                                                         "Write a short poem about the sea.",
                                                         "Give three tips for staying healthy."]
    assert all(isinstance(s["answer"], str) for s in metrics["samples"])
    warnings = client.get(created.json()["job"]["url"]).json()["result"]["warnings"]
    assert bool(warnings) == metrics["flags"]["worse_than_uniform"]
    assert all("uniformly" in warning for warning in warnings)


def test_flags_in_words() -> None:
    from worker.tasks import quality_flags, quality_warnings

    metrics = {"dev_loss": 5.0, "alpha_0_dev_loss": 4.0, "validation_loss": 4.7}
    metrics["flags"] = quality_flags(metrics, 97)
    assert metrics["flags"] == {"worse_than_alpha_0": True, "worse_than_uniform": True}  # ln 97 = 4.575
    alpha_0, uniform = quality_warnings(metrics, 97)
    assert "5.000" in alpha_0 and "4.000" in alpha_0 and "alpha 0" in alpha_0
    assert "validation loss (4.700)" in uniform and "ln 97 = 4.575" in uniform
    unmeasured = {"dev_loss": 4.0, "alpha_0_dev_loss": None, "validation_loss": None}  # no data set: dev rows
    unmeasured["flags"] = quality_flags(unmeasured, 97)
    assert unmeasured["flags"] == {"worse_than_alpha_0": None, "worse_than_uniform": False}
    assert quality_warnings(unmeasured, 97) == []


def test_heal_steps_resume_after_a_hand_back_and_report_metrics_before_and_after(
        client: TestClient, settings: Settings, tiny_anchors: tuple[Path, Path],
        progress_events: list[Event]) -> None:
    chain = register(client, settings, tiny_anchors, distillation=QUICK)
    created = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), "heal": {"steps": 20}})
    assert created.status_code == 202, created.text
    model_id = created.json()["id"]

    def shut_down_mid_heal(ctx: JobContext, event: ProgressEvent) -> None:
        if event.stage == "heal" and event.step >= 12:  # past the checkpoint at step 10 (every 20 // 5, at least 10)
            SHUTDOWN.set()

    HOOKS.append(shut_down_mid_heal)
    try:
        assert run_pending(settings) == ["released"]
    finally:
        SHUTDOWN.clear()
        HOOKS.clear()
    heal_work = settings.work_dir / "heal" / model_id
    assert heal_work.is_dir()  # the checkpoints stay for the next attempt
    assert client.get(f"/models/{model_id}").json()["files"] == []
    progress_events.clear()
    assert run_pending(settings) == ["succeeded"]
    heal_steps = [step for stage, step, *_ in progress_events if stage == "heal"]
    assert heal_steps[0] == 10 and heal_steps[-1] == 20  # resumed from the checkpoint, not from step 0
    model = client.get(f"/models/{model_id}").json()
    heal = model["metrics"]["heal"]
    assert heal["steps"] == 20 and heal["validation_loss_before"] > 0 and heal["validation_loss"] > 0
    assert heal["validation_loss"] <= heal["validation_loss_before"]  # the dev rows keep the better one
    cbd = client.get(f"/models/{model_id}/files/cbd.json").json()
    assert cbd["distillation"]["stage"] == "heal" and cbd["distillation"]["steps"] == 20
    assert not heal_work.exists() and list((settings.work_dir / "models").iterdir()) == []


def test_a_cancelled_heal_leaves_nothing_half_written(client: TestClient, settings: Settings,
                                                      tiny_anchors: tuple[Path, Path],
                                                      progress_events: list[Event]) -> None:
    chain = register(client, settings, tiny_anchors, distillation=QUICK)
    created = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), "heal": {"steps": 50}})
    model_id, job_url = created.json()["id"], created.json()["job"]["url"]

    def cancel_mid_heal(ctx: JobContext, event: ProgressEvent) -> None:
        if event.stage == "heal" and event.step >= 12 and not ctx.cancelled:
            assert client.post(f"{job_url}/cancel").status_code == 202
            ctx.cancelled = True  # what the next heartbeat reads from the job

    HOOKS.append(cancel_mid_heal)
    assert run_pending(settings) == ["cancelled"]
    assert client.get(job_url).json()["status"] == "cancelled"
    model = client.get(f"/models/{model_id}").json()
    assert model["status"] == "cancelled" and model["files"] == []
    assert not (settings.work_dir / "heal" / model_id).exists()
    assert list((settings.work_dir / "models").iterdir()) == []


def test_registered_anchors_record_their_calibration_and_models_read_it(client: TestClient, settings: Settings,
                                                                        tiny_anchors: tuple[Path, Path]) -> None:
    before = {p: sorted(q.name for q in p.iterdir()) for p in tiny_anchors}
    for dataset, source in ((None, "default"), ({"path": str(DOLLY)}, str(DOLLY))):
        chain = register(client, settings, tiny_anchors, **({"dataset": dataset} if dataset else {}))
        for anchor in chain["anchors"]:
            assert FILE_NAME in {f["name"] for f in anchor["files"]}
            calibration = client.get(f"/chains/{chain['id']}/anchors/{anchor['index']}/files/{FILE_NAME}").json()
            assert calibration["source"] == source and calibration["importance"] and calibration["dev_rows"]
    assert {p: sorted(q.name for q in p.iterdir()) for p in tiny_anchors} == before  # nothing written there
    created = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain), "alpha": 0.5})
    assert run_pending(settings) == ["succeeded"]
    provenance = client.get(f"/models/{created.json()['id']}").json()["provenance"]
    assert provenance["importance"] == {"kind": "activation", "calibration": str(DOLLY),
                                        "rows": len(calibration["importance"])}
    assert json.dumps(provenance).count("magnitude") == 0
