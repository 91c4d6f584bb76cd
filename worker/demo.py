"""The demo chain of `cbd serve --demo`: SmolLM2-135M-Instruct and a 90M anchor derived from it (distill: false).

Runs once in its own process before the service starts, so the README's POST /models works at once.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sqlalchemy import select

from app.models import Chain
from app.schemas import ChainCreate
from app.services.chains import create_chain
from worker.runner import run_job
from worker.tasks import HANDLERS, SMOLLM2_ID, runtime

log = logging.getLogger("cbd.demo")
DEMO_NAME = "smollm2-demo"
DEMO_ANCHOR_SIZE = "90M"


def derive_anchor(folder: Path, source: Path, dataset: Path | None, calibration_rows: int) -> Path:
    if (folder / "config.json").is_file():
        return folder
    from cbd_engine.data import calibration_texts
    from cbd_engine.materialize import materialize

    log.info("deriving the demo's %s anchor from %s", DEMO_ANCHOR_SIZE, source)
    materialize(folder, large=source, size=DEMO_ANCHOR_SIZE, dtype="float32",
                calibration=calibration_texts(dataset, calibration_rows) if dataset else None)
    return folder


def ensure_demo_chain(dataset: Path | None) -> str:
    """The id of the ready demo chain, registering (and deriving) it first if needed."""
    from cbd_engine.zoo import smollm2_135m_instruct

    settings, session_factory, _, worker_id = runtime()
    with session_factory() as session:
        ready = session.scalar(select(Chain.id).where(Chain.name == DEMO_NAME, Chain.status == "ready"))
    if ready:
        return ready
    source = smollm2_135m_instruct()
    anchor = derive_anchor(settings.data_dir.resolve() / "demo" / f"smollm2-{DEMO_ANCHOR_SIZE}", source, dataset,
                            settings.calibration_rows)
    roots = [anchor.parent] + ([dataset.parent] if dataset else [])
    body = ChainCreate(name=DEMO_NAME, source=SMOLLM2_ID, anchors=[{"checkpoint": str(anchor), "distill": False}],
                       dataset={"path": str(dataset)} if dataset else None, device="cpu")
    own = settings.model_copy(update={"allowed_source_roots": [*settings.allowed_source_roots, *roots],
                                      "max_concurrent_jobs": 0, "broker_url": ""})
    with session_factory() as session:
        chain, job = create_chain(session, own, body, "demo")
    status = run_job(job.id, settings, session_factory, HANDLERS, worker_id)
    if status != "succeeded":
        raise RuntimeError(f"registering the demo chain ended {status}; see job {job.id}")
    return chain.id


def main() -> None:
    from app.logging import configure_logging

    configure_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path)
    args = parser.parse_args()
    print(ensure_demo_chain(args.dataset.resolve() if args.dataset else None))


if __name__ == "__main__":
    main()
