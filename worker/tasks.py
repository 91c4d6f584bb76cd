"""The tasks: build_chain, materialize_model, evaluate_model, export_model. Heavy: the engine (and torch) is
imported in here only.

The same handlers run under Celery (`cbd worker`) and in the embedded worker process of `cbd serve`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from billiard.process import active_children
from celery.signals import worker_process_init, worker_shutting_down
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
from app.models import Anchor, Artifact, Chain, Export, Job, Model
from app.services.chains import is_registration
from app.services.exports import release_waiting
from app.services.files import record_files
from app.services.jobs import dispatch
from app.services.models import alpha_requested, samples_seconds
from app.services.sources import checkpoint, dataset_file, dataset_id
from app.settings import Settings
from app.storage import ArtifactStore, StoredFile, link_folder, open_store, put_folder
from cbd_engine.nn.loading import has_tokenizer
from cbd_engine.spec.chain import distillation_settings
from cbd_engine.spec.estimate import FLOPS_PER_SECOND
from cbd_engine.spec.progress import Cancelled, ProgressCallback, ProgressEvent, no_progress
from worker.celery_app import celery
from worker.model_card import model_card
from worker.runner import SHUTDOWN, Handler, JobContext, run_job, worker_identity

if TYPE_CHECKING:
    from cbd_engine.materialization.recipe import MaterializeResult

log = logging.getLogger("cbd.worker")
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


def measure_validation_loss(model_dir: Path, chain_spec: dict, settings: Settings,
                            progress: ProgressCallback = no_progress) -> float | None:
    """Response-token loss on the chain dataset's validation rows (None without an instruction file or a tokenizer);
    `progress` sees the stage "validation", row by row."""
    dataset = chain_spec.get("dataset") or {}
    path = dataset.get("path")
    if not path or not path.endswith((".jsonl", ".json")) or not has_tokenizer(model_dir):
        return None
    from cbd_engine.nn.validation import validation_loss

    return float(validation_loss(model_dir, path, max_rows=settings.validation_rows,
                                 prompt_format=dataset.get("prompt_format", "alpaca"), progress=progress))


# --- folders -------------------------------------------------------------------------------------------------


def readable_roots(settings: Settings) -> list[Path]:
    """Where the files a worker publishes may lie: the allowed roots, its own work folder, and the caches it fetches
    sources into (the Hub's, the engine zoo's). A link in a registered folder that leads elsewhere fails the job."""
    from huggingface_hub.constants import HF_HUB_CACHE

    from cbd_engine.io.cache import cache_dir

    own = (settings.work_dir, Path(HF_HUB_CACHE), cache_dir())
    return [*settings.source_roots, *(path.resolve() for path in own)]


def source_folder(reference: str, settings: Settings) -> Path:
    """A local model folder for a source (the engine's one resolver): a folder as it is, a zoo model fetched
    offline, a GGUF file converted once (keyed by content), a Hub id fetched."""
    from cbd_engine.io.sources import HubAccess, resolve_source

    confine_hub()
    hub = HubAccess(token=settings.hub_token.get_secret_value() or False, endpoint=settings.hub_endpoint or None,
                    max_bytes=settings.max_source_bytes)
    return resolve_source(reference, settings.work_dir, hub)


def confine_hub() -> None:
    """No implicit Hub credentials in this process (huggingface_hub, datasets, transformers): what a user's request
    fetches from the Hub is fetched with `CBD_HUB_TOKEN` or anonymously, never with the worker's own login."""
    from huggingface_hub import constants

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # for processes started from here
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # read at each request; the variable only at import


def anchor_folder(session: Session, store: ArtifactStore, anchor: Anchor, settings: Settings) -> Path:
    rows = session.scalars(select(Artifact).where(Artifact.owner_id == anchor.id)).all()
    files = [StoredFile(r.name, r.size, r.sha256) for r in rows]
    return link_folder(store, files, settings.work_dir / "anchors" / anchor.id)


@contextlib.contextmanager
def stage(ctx: JobContext, name: str, eta_seconds: float | None = None) -> Iterator[None]:
    """Work the engine reports no progress for, shown as its own stage (with an estimate where there is one)."""
    ctx.progress(ProgressEvent(name, 0, 1, eta_seconds=eta_seconds), force=True)
    yield
    ctx.progress(ProgressEvent(name, 1, 1, eta_seconds=0.0), force=True)


def fresh_dir(path: Path) -> Path:
    """`path` gone, along with the temporary siblings a killed attempt may have left."""
    shutil.rmtree(path, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- build_chain ---------------------------------------------------------------------------------------------


def _register_folders(ctx: JobContext, chain: Chain, folders: list[Path], metrics: list[dict],
                      extra: list[Path]) -> None:
    """Record anchors (index 0 = the source) from model folders: shape and count from config.json, files stored
    (with the `extra` files, which replace a folder's own of the same name), the engine's metrics kept, and the
    validation loss measured where the engine did not report one."""
    from cbd_engine.spec.families import ModelSpec
    from cbd_engine.spec.shapes import check_same_chain

    specs = [ModelSpec.from_config(json.loads((folder / "config.json").read_text())) for folder in folders]
    for i in range(1, len(specs)):
        check_same_chain(specs[i].shape, specs[i - 1].shape)
        if specs[i].num_params >= specs[i - 1].num_params:
            raise ValueError(f"anchors must descend in size: anchor {i} has {specs[i].num_params} parameters, "
                             f"anchor {i - 1} {specs[i - 1].num_params}")
    store, roots = store_of(ctx), readable_roots(ctx.settings)
    added = [store.put_file(path) for path in extra]
    replaced = {f.name for f in added}
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
            own = [f for f in put_folder(store, folder, roots) if f.name not in replaced]
            record_files(session, anchor.id, own + added)
            anchors.append(anchor)
        row = session.get(Chain, chain.id)
        row.family = specs[0].family.name
        ctx.commit(session)
    for anchor, folder, known in zip(anchors, folders, metrics, strict=True):
        if ctx.should_stop():
            raise Cancelled()
        loss = known.get("validation_loss")
        if loss is None:
            loss = measure_validation_loss(folder, chain.spec, ctx.settings)
        with ctx.session_factory() as session:
            session.get(Anchor, anchor.id).metrics = {**known, "validation_loss": loss}
            ctx.commit(session)


def registration_calibration(spec: dict, folder: Path) -> Path:
    """The calibration.json every anchor of a registered chain records, as build_chain writes it into the anchors
    it builds: the chain's instruction rows, else the package's default set. Written into `folder`, never into the
    registered checkpoints (they may be read-only user folders)."""
    from cbd_engine.data.calibration import Calibration, default_calibration
    from cbd_engine.data.rows import is_instruction_file

    dataset = spec.get("dataset") or {}
    path = dataset.get("path")
    if path and is_instruction_file(path):
        calibration = Calibration.from_file(path, dataset.get("prompt_format", "alpaca"))
    else:
        calibration = default_calibration()
    folder.mkdir(parents=True, exist_ok=True)
    return calibration.save(folder)


def confined_dataset(dataset: dict | None, settings: Settings) -> dict | None:
    """The data set resolved again here, through the API's own door (a file may have grown, or a link been planted,
    while the job was queued; `datasets` reads an id that names a folder relative to the working folder from the
    disk, and this worker's working folder is not the API's); a Hub data set's size checked before it is fetched."""
    if not dataset:
        return dataset
    if dataset.get("path"):
        return {**dataset, "path": dataset_file(settings, "dataset.path", dataset["path"])}
    if not dataset.get("hf"):
        return dataset
    resolved = dataset_id(settings, "dataset.hf", dataset["hf"])
    if not Path(resolved).is_absolute():
        check_hub_dataset(resolved, settings)
    return {**dataset, "hf": resolved}


def check_hub_dataset(repo_id: str, settings: Settings) -> None:
    """A Hub data set within CBD_MAX_DATASET_BYTES, asked anonymously (as `datasets` then fetches it)."""
    from huggingface_hub import HfApi, constants

    confine_hub()
    if constants.HF_HUB_OFFLINE:  # `datasets` reads its cache only: nothing is fetched
        return
    info = HfApi(endpoint=settings.hub_endpoint or None).dataset_info(repo_id, files_metadata=True, token=False)
    size = sum(s.size or 0 for s in info.siblings or [])
    if size > settings.max_dataset_bytes:
        raise ValueError(f"dataset.hf {repo_id} has {size} bytes, more than this server's CBD_MAX_DATASET_BYTES "
                         f"({settings.max_dataset_bytes})")


def confined_spec(spec: dict, settings: Settings) -> dict:
    """The chain's references resolved again when its build starts, through the API's own door: a link leading
    outside the roots may have been planted in a folder while the job was queued."""
    anchors = [{**a, "checkpoint": checkpoint(settings, f"anchors.{i}.checkpoint", a["checkpoint"])}
               if a.get("checkpoint") else a for i, a in enumerate(spec["anchors"])]
    bridge = spec.get("bridge")
    if bridge and isinstance(bridge["model"], str):
        bridge = {**bridge, "model": checkpoint(settings, "bridge.model", bridge["model"])}
    return {**spec, "source": checkpoint(settings, "source", spec["source"]), "anchors": anchors, "bridge": bridge,
            "dataset": confined_dataset(spec.get("dataset"), settings)}


def build_chain(ctx: JobContext) -> None:
    with ctx.session_factory() as session:
        chain = session.get(Chain, ctx.subject_id)
        session.expunge(chain)
    spec = confined_spec(chain.spec, ctx.settings)
    work = ctx.settings.work_dir / "chains" / chain.id
    with stage(ctx, "source"):  # the first run of the demo fetches SmolLM2 here
        source = source_folder(spec["source"], ctx.settings)
    if is_registration(spec):
        folders = [source] + [Path(a["checkpoint"]) for a in spec["anchors"]]
        metrics = [{} for _ in folders]
        extra = [registration_calibration(spec, work / "calibration")]
    else:
        from cbd_engine.pipelines.chain import build_chain as engine_build_chain

        result = engine_build_chain({**spec, "source": str(source)}, work, resume=True, progress=ctx.progress,
                                    should_stop=ctx.should_stop)
        built = sorted(result.anchors, key=lambda a: a.index)
        folders, metrics, extra = [Path(a.path) for a in built], [dict(a.metrics or {}) for a in built], []
    with stage(ctx, "register anchors"):
        _register_folders(ctx, chain, folders, metrics, extra)
    with ctx.session_factory() as session:
        session.get(Chain, chain.id).status = "ready"
        ctx.commit(session)
    # the anchors are in the store now; the engine's folder (kept until here so a retried attempt resumes) would
    # only hold second copies of them
    shutil.rmtree(work, ignore_errors=True)


# --- materialize_model ---------------------------------------------------------------------------------------

PROVENANCE_FIELD_BYTES = 8192


def summary(provenance: dict) -> dict:
    """The provenance the API returns with the model: bulky fields (per-tensor index maps) stay in cbd.json, a file
    of the model, so that every GET /models/{id} stays small."""
    kept = {k: v for k, v in provenance.items() if len(json.dumps(v)) <= PROVENANCE_FIELD_BYTES}
    omitted = sorted(set(provenance) - set(kept))
    return {**kept, "omitted": omitted, "full": "cbd.json"} if omitted else kept



def quality_metrics(provenance: dict, small: Anchor, large: Anchor) -> dict:
    """The materialization's own quality report (on the calibration's dev rows), with the anchors' validation loss
    and their dev loss keyed by anchor id."""
    quality = provenance.get("quality") or {}
    anchors_dev = quality.get("anchors_dev_loss") or {}
    return {"dev_loss": quality.get("dev_loss"), "alpha_0_dev_loss": quality.get("alpha_0_dev_loss"),
            "anchors_dev_loss": {a.id: anchors_dev.get(role) for role, a in (("small", small), ("large", large))},
            "anchors_validation_loss": {a.id: (a.metrics or {}).get("validation_loss") for a in (small, large)},
            "alphas": provenance.get("alphas")}


def quality_flags(metrics: dict, vocab_size: int) -> dict:
    """worse_than_alpha_0: the mix loses to the larger anchor pruned to the size (dev rows); worse_than_uniform: the
    model is worse than guessing uniformly, on the validation rows where measured, else on the dev rows. None:
    not measured."""
    loss = metrics.get("validation_loss") if metrics.get("validation_loss") is not None else metrics.get("dev_loss")
    dev, alpha_0 = metrics.get("dev_loss"), metrics.get("alpha_0_dev_loss")
    return {"worse_than_alpha_0": None if dev is None or alpha_0 is None else dev > alpha_0,
            "worse_than_uniform": None if loss is None else loss > math.log(vocab_size)}


def quality_warnings(metrics: dict, vocab_size: int) -> list[str]:
    """The flags in words, for the job's result."""
    flags, found = metrics["flags"], []
    if flags["worse_than_alpha_0"]:
        found.append(f"this model's dev loss ({metrics['dev_loss']:.3f}) is worse than that of alpha 0, the larger "
                     f"anchor pruned to this size ({metrics['alpha_0_dev_loss']:.3f}): request alpha \"auto\" (or 0) "
                     "for a better model of this size")
    if flags["worse_than_uniform"]:
        measured = "validation" if metrics.get("validation_loss") is not None else "dev"
        loss = metrics[f"{measured}_loss"]
        found.append(f"this model's {measured} loss ({loss:.3f}) is worse than guessing uniformly over its "
                     f"{vocab_size} tokens (ln {vocab_size} = {math.log(vocab_size):.3f}): it is not usable as it "
                     "is; heal it (\"heal\": {\"steps\": ...}) or pick a size nearer an anchor")
    return found


def heal_model(ctx: JobContext, model: Model, chain: Chain, materialized: Path, teacher: Path, out: Path,
               work: Path) -> dict:
    """Heal steps from the larger anchor on the chain's data set with the chain's distillation settings, resumed
    from the checkpoints in `work` that an earlier attempt left; the metrics before and after."""
    from dataclasses import replace

    from cbd_engine.pipelines.heal import heal
    from cbd_engine.spec.distill_config import DistillConfig

    # the chain's settings, on this worker's device (a queue is a device)
    config = replace(DistillConfig.from_dict(distillation_settings(chain.spec)), device=ctx.queue)
    dataset = confined_dataset(chain.spec.get("dataset"), ctx.settings)
    result = heal(materialized, teacher, out, model.heal["steps"], dataset=dataset,
                  learning_rate=model.heal.get("learning_rate"), config=config, work_dir=work, resume=True,
                  progress=ctx.progress, should_stop=ctx.should_stop)
    return {"steps": model.heal["steps"], "validation_loss_before": result.metrics["validation_loss_before"],
            "validation_loss": result.metrics["validation_loss"], "best_step": result.metrics["best_step"]}


def _update_model(ctx: JobContext, model_id: str, **metrics: object) -> None:
    with ctx.session_factory() as session:
        row = session.get(Model, model_id)
        row.metrics = {**(row.metrics or {}), **metrics}
        ctx.commit(session)


def publish_model(ctx: JobContext, store: ArtifactStore, model_id: str, folder: Path, known: dict[str, str],
                  result: MaterializeResult, metrics: dict, started: float) -> list[StoredFile]:
    """The model's files into the store and its row ready, with what is known of its quality so far."""
    built = time.monotonic()
    with stage(ctx, "publish"):
        stored = put_folder(store, folder, readable_roots(ctx.settings), known)
    timings = {"materialize_seconds": round(built - started, 3), "publish_seconds": round(time.monotonic() - built, 3)}
    with ctx.session_factory() as session:
        row = session.get(Model, model_id)
        session.execute(delete(Artifact).where(Artifact.owner_id == model_id))
        record_files(session, model_id, stored)
        row.params, row.alpha, row.status = result.params, result.alpha, "ready"
        row.provenance = {**summary(result.provenance), "service": timings}
        row.metrics = {**(row.metrics or {}), **metrics}
        session.flush()  # the model's row lock, before the waiting exports are read (exports.request_export)
        waiting = release_waiting(session, row, ctx.queue)
        ctx.commit(session)  # the files are downloadable from here on, and the exports a fits request asked are queued
        for job in waiting:
            dispatch(session, ctx.settings, job)
    return stored


def measure_model(ctx: JobContext, model: Model, chain: Chain, folder: Path, metrics: dict) -> None:
    """The published model's validation loss, its quality flags (in words in the job's result), and greedy samples,
    each its own stage."""
    from cbd_engine.evaluation.samples import sample_answers

    speed = FLOPS_PER_SECOND[ctx.queue]
    metrics["validation_loss"] = measure_validation_loss(folder, chain.spec, ctx.settings, ctx.progress)
    vocab = model.shape["vocab_size"]
    metrics["flags"] = quality_flags(metrics, vocab)
    _update_model(ctx, model.id, validation_loss=metrics["validation_loss"], flags=metrics["flags"])
    with ctx.session_factory() as session:
        session.execute(update(Job).where(Job.id == ctx.job_id).values(warnings=quality_warnings(metrics, vocab)))
        ctx.commit(session)
    with stage(ctx, "samples", samples_seconds(model.params, speed)):
        prompt_format = (chain.spec.get("dataset") or {}).get("prompt_format", "alpaca")
        samples = sample_answers(folder, prompt_format=prompt_format) if has_tokenizer(folder) else None
    _update_model(ctx, model.id, samples=samples)


def materialize_model(ctx: JobContext) -> None:
    """Materialize (then heal, when asked), publish, then measure the model."""
    from cbd_engine.materialization.recipe import materialize
    from cbd_engine.spec.shapes import Shape

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
    work = ctx.settings.work_dir
    out = fresh_dir(work / "models" / model.id)
    healed = work / "models" / f"{model.id}.healed"
    evaluated = work / "models" / f"{model.id}.eval"
    heal_work = work / "heal" / model.id  # kept while the job is to run again: the next attempt resumes there
    resumable = False
    try:  # the other work folders go whatever happens: the store holds what was published, a retry starts afresh
        started = time.monotonic()
        result = materialize(out, small=small_dir, large=large_dir, shape=Shape.from_dict(model.shape),
                             alpha=alpha_requested(model.alpha_request), mix=model.mix, init=model.init,
                             dtype=model.dtype, seed=model.seed, progress=ctx.progress, should_stop=ctx.should_stop,
                             quality=True)  # the model's flags: worse than alpha 0, than uniform
        folder, known = out, {f.name: f.sha256 for f in result.files}
        metrics = quality_metrics(result.provenance, small, large)
        if model.heal:
            metrics["heal"] = heal_model(ctx, model, chain, out, large_dir, fresh_dir(healed), heal_work)
            folder, known = healed, {}
        if ctx.should_stop():
            raise Cancelled("materialization cancelled before it was published")
        card = model_card(model, chain, small, large, large_dir, folder, result.provenance, metrics)
        (folder / "README.md").write_text(card, encoding="utf-8")  # replaces a card copied from the source
        known.pop("README.md", None)
        stored = publish_model(ctx, store, model.id, folder, known, result, metrics, started)
        measure_model(ctx, model, chain, link_folder(store, stored, evaluated), metrics)
    except BaseException as error:
        resumable = ctx.runs_again_after(error)
        raise
    finally:
        for scratch in (out, healed, evaluated):
            shutil.rmtree(scratch, ignore_errors=True)
        if not resumable:
            shutil.rmtree(heal_work, ignore_errors=True)


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


# --- export_model --------------------------------------------------------------------------------------------


def measure_export(ctx: JobContext, fmt: str, path: Path, model_dir: Path, chain_spec: dict) -> dict:
    """The export's quality as the device runs it: its validation loss in its runtime (llama.cpp, onnxruntime-genai)
    on the chain's validation rows, as the model's own is measured (None without an instruction file), and greedy
    answers to the fixed instructions through the export's own tokenizer and chat template."""
    from cbd_engine.export.formats import FORMATS
    from cbd_engine.spec.options import SAMPLE_PROMPTS, SAMPLE_TOKENS

    export_format = FORMATS[fmt]
    dataset = chain_spec.get("dataset") or {}
    data = dataset.get("path")
    loss = None
    if data and data.endswith((".jsonl", ".json")):
        loss = export_format.validation_loss(path, model_dir, data, max_rows=ctx.settings.validation_rows,
                                             prompt_format=dataset.get("prompt_format", "alpaca"),
                                             progress=ctx.progress)
    with stage(ctx, "samples"), contextlib.suppress(RuntimeError):  # a template the runtime cannot run: no samples
        with export_format.runtime(path) as runtime:
            return {"validation_loss": loss,
                    "samples": [{"prompt": p, "answer": runtime.chat(p, SAMPLE_TOKENS)} for p in SAMPLE_PROMPTS]}
    return {"validation_loss": loss, "samples": None}


def export_model(ctx: JobContext) -> None:
    """Write the export from the model's stored files, measure it in its runtime, then publish it: its files (one
    GGUF file, or an ONNX folder's files under `<precision>/`) are downloadable only with its metrics."""
    from cbd_engine.export.formats import FORMATS, export_files
    from cbd_engine.spec.export import export_path

    store = store_of(ctx)
    with ctx.session_factory() as session:
        export = session.get(Export, ctx.subject_id)
        model = session.get(Model, export.model_id)
        chain = session.get(Chain, model.chain_id)
        rows = session.scalars(select(Artifact).where(Artifact.owner_id == model.id)).all()
        files = [StoredFile(r.name, r.size, r.sha256) for r in rows]
        export.status = "running"
        ctx.commit(session)
        session.expunge_all()
    work = fresh_dir(ctx.settings.work_dir / "exports" / export.id)
    try:
        folder = link_folder(store, files, work / "model")
        with stage(ctx, "write"):
            path = FORMATS[export.format].write(folder, work / export_path(export.format, export.quant),
                                                export.quant, f"cbd/{model.id}")
        written = export_files(path)
        metrics = {"size_bytes": sum(item.stat().st_size for _, item in written),
                   **measure_export(ctx, export.format, path, folder, chain.spec)}
        if ctx.should_stop():
            raise Cancelled("export cancelled before it was published")
        with stage(ctx, "publish"):
            stored = [(name, store.put_file(item)) for name, item in written]
        with ctx.session_factory() as session:
            session.execute(delete(Artifact).where(Artifact.owner_id == export.id))
            record_files(session, export.id, [StoredFile(name, s.size, s.sha256) for name, s in stored])
            row = session.get(Export, export.id)
            # the model's own loss read now: a fits request's export is queued when the model is published, and
            # may run while the model is still being measured; the export's own metrics (fits) kept
            measured = session.get(Model, model.id).metrics or {}
            row.status = "ready"
            row.metrics = {**(row.metrics or {}), **metrics, "model_validation_loss": measured.get("validation_loss")}
            ctx.commit(session)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def warm_up() -> None:
    """Import the engine (torch, transformers) when a worker starts, not inside its first job."""
    import cbd_engine.materialization.recipe  # noqa: F401
    import cbd_engine.nn.loading  # noqa: F401


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
                                "evaluate_model": evaluate_model, "export_model": export_model}


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


@celery.task(name="cbd.export_model")
def export_model_task(job_id: str) -> str:
    return run(job_id)
