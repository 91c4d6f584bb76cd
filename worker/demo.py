"""The demo chain of `cbd serve --demo`: a real chain, built by the embedded worker, queued at once.

SmolLM2-135M-Instruct (fetched offline by the worker, cbd_engine.io.zoo) and one anchor of DEMO_ANCHOR_SIZE derived from
it: pruned by activations on the package's own calibration set and distilled on it, so the README's first command
works on a machine with nothing but the package. `cbd serve` listens at once; the chain is listed as being built and
its job reports progress per stage and an estimate. Torch-free: this runs in the API process.

DEMO_RECIPE is part of the demo chain's identity (its name): a demo chain of another recipe is replaced, with its
anchors, models, jobs and files, and a demo chain being built or ready is never built twice.
"""

from __future__ import annotations

import logging
import shutil

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory
from app.errors import ApiError
from app.models import Chain, Job, Model
from app.schemas import ChainCreate
from app.services import jobs
from app.services.chains import create_chain, delete_chain
from app.settings import Settings
from app.storage import ArtifactStore, open_store
from cbd_engine.data.calibration import DEFAULT_SET
from cbd_engine.spec.sources import SMOLLM2_ID

log = logging.getLogger("cbd.demo")
DEMO_NAME = "smollm2-demo"
DEMO_OWNER = "demo"  # no token has this name: token owners are token ids, or "anonymous"
DEMO_RECIPE = 2  # 1: a 90M checkpoint derived by magnitude pruning, registered as it was (distill: false)
DEMO_ANCHOR_SIZE = "90M"
# The distillation of the demo's anchor (the recipe's defaults otherwise: forward KL, lr 3e-4): 150 steps of 4 rows
# is about 10 minutes on an idle 2-core CPU, so the first start stays under about 15 (bench/demo.py; docs/RESULTS.md)
DEMO_DISTILLATION = {"steps": 150, "batch_size": 4, "max_length": 256, "eval_every": 50, "checkpoint_every": 50}
KEPT = ("queued", "running", "ready")  # a demo chain in another state (failed, cancelled) is built anew


def demo_chain_name() -> str:
    return f"{DEMO_NAME}-r{DEMO_RECIPE}"


def demo_chain_body() -> ChainCreate:
    return ChainCreate(name=demo_chain_name(), source=SMOLLM2_ID, anchors=[{"size": DEMO_ANCHOR_SIZE}],
                       dataset={"path": str(DEFAULT_SET)}, distillation=DEMO_DISTILLATION, device="cpu")


def ensure_demo_chain(settings: Settings) -> tuple[Chain, Job | None]:
    """The demo chain of this recipe and its latest job: the one being built or ready, else a new one queued for
    the workers. Nothing is built here: this returns at once."""
    engine = make_engine(settings.resolved_database_url)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    try:
        with make_session_factory(engine)() as session:
            demo_chains = list(session.scalars(select(Chain).where(Chain.owner == DEMO_OWNER).order_by(Chain.id)))
            kept = next((c for c in reversed(demo_chains) if c.name == demo_chain_name() and c.status in KEPT), None)
            for chain in demo_chains:
                if chain is not kept:
                    _replace(session, store, settings, chain)
            if kept is None:
                own = settings.model_copy(update={"max_concurrent_jobs": 0})
                kept, _ = create_chain(session, own, demo_chain_body(), DEMO_OWNER)
                log.info("demo chain %s queued (recipe %d)", kept.id, DEMO_RECIPE)
            return kept, jobs.latest_job(session, kept.id)
    finally:
        engine.dispose()


def _replace(session: Session, store: ArtifactStore, settings: Settings, chain: Chain) -> None:
    """Delete an outdated (or failed) demo chain. Its jobs and its models' jobs are cancelled first; one still
    running stops at its next step, and the chain is deleted at a later start."""
    subjects = [chain.id, *session.scalars(select(Model.id).where(Model.chain_id == chain.id))]
    for job_id in session.scalars(select(Job.id).where(Job.subject_id.in_(subjects), Job.status.in_(jobs.ACTIVE))):
        jobs.cancel_job(session, job_id, DEMO_OWNER, is_admin=True)
    try:
        delete_chain(session, store, chain.id, settings.blob_grace_seconds, cascade=True)
    except ApiError as error:
        log.warning("the outdated demo chain %s stays until its job stops: %s", chain.id, error.detail)
        return
    log.info("replaced the outdated demo chain %s (%s)", chain.id, chain.name)
    shutil.rmtree(settings.data_dir / "demo", ignore_errors=True)  # recipe 1's derived anchor, registered from there
