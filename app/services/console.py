"""What the console's pages show, each read in a few queries whatever the registry's size (bench/console.py: every
page within 100 ms for 1,000 models). Rendered by app/templates/console; data only through the services the API
uses, so that a page shows what the API answers."""

from __future__ import annotations

import csv
import io
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.models import Anchor, Job, Model
from app.schemas import ChainOut, JobOut, ModelOut, SignedLinks
from app.services import chains, jobs, models
from app.services.charts import Chart, Point, curves, size_quality
from app.services.pagination import paginate
from app.settings import Settings
from app.storage import ArtifactStore

PAGE = 50  # rows of a list page
CURVE_FILE = "loss_curve.csv"  # the engine's distillation curve, among a distilled anchor's files


def human_params(count: float) -> str:
    """135M, 1.2B: the API's size notation, to three significant digits."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 1:
        return "under a second"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"


def when(value: datetime | None) -> str:
    if value is None:
        return "not yet"
    return value.replace(tzinfo=value.tzinfo or timezone.utc).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def can_cancel(principal: Principal, job: Job) -> bool:
    """As POST /jobs/{id}/cancel decides: a build token its own active jobs, an admin any."""
    return job.status in jobs.ACTIVE and principal.has("build") and (job.owner == principal.name or
                                                                      principal.has("admin"))


@dataclass(frozen=True)
class JobView:
    job: JobOut
    cancellable: bool
    subject_url: str


def job_view(principal: Principal, job: Job) -> JobView:
    kind = "chains" if job.kind == "build_chain" else "models"
    return JobView(jobs.job_out(job), can_cancel(principal, job), f"/ui/{kind}/{job.subject_id}")


@dataclass(frozen=True)
class ChainRow:
    chain: ChainOut
    models: int
    job: JobOut | None


def chains_page(session: Session, page_token: str | None) -> tuple[list[ChainRow], str | None]:
    page = chains.list_chains(session, PAGE, page_token, None, None)
    ids = [c.id for c in page.items]
    counts = dict(session.execute(select(Model.chain_id, func.count()).where(Model.chain_id.in_(ids))
                                  .group_by(Model.chain_id)).all())
    job_ids = [c.job.id for c in page.items if c.job is not None]
    latest = {j.id: jobs.job_out(j) for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
    rows = [ChainRow(c, counts.get(c.id, 0), latest.get(c.job.id) if c.job else None) for c in page.items]
    return rows, page.next_page_token


def lineage(spec: dict, index: int) -> str:
    """How anchor `index` came to be, from the chain's request."""
    if index == 0:
        return "the bridge model, distilled from the source" if spec.get("bridge") else "the source"
    anchor = spec["anchors"][index - 1]
    if anchor.get("checkpoint") and not anchor.get("distill", True):
        return "a registered checkpoint, kept as it is"
    start = "started from a checkpoint" if anchor.get("checkpoint") else "pruned by activations"
    return f"{start} from anchor {index - 1}, then distilled from it"


@dataclass(frozen=True)
class ChainView:
    chain: ChainOut
    job: JobOut | None
    lineage: list[str]
    chart: Chart | None
    curves: list[tuple[int, Chart]]
    models: list[Any]  # the newest PAGE models' rows (id, params, status, validation loss)
    model_count: int
    low: int | None  # the range a request may ask for: the smallest and largest ready anchor
    high: int | None


def chain_view(session: Session, store: ArtifactStore, chain_id: str) -> ChainView:
    chain = chains.get_chain(session, chain_id)
    out = chains.chain_out(session, chain)
    latest = jobs.latest_job(session, chain.id)
    rows = [tuple(row) for row in session.execute(
        select(Model.id, Model.params, Model.status, Model.metrics["validation_loss"].as_float())
        .where(Model.chain_id == chain.id).order_by(Model.id.desc()))]
    ready = [a.params for a in out.anchors if a.status == "ready"]
    return ChainView(out, jobs.job_out(latest) if latest else None,
                     [lineage(chain.spec, a.index) for a in out.anchors], chain_chart(out, rows),
                     [(a.index, chart) for a in out.anchors if (chart := anchor_curves(store, a)) is not None],
                     rows[:PAGE], len(rows), min(ready) if len(ready) > 1 else None,
                     max(ready) if len(ready) > 1 else None)


def chain_chart(chain: ChainOut, rows: list[tuple]) -> Chart | None:
    """Every ready model of the chain, then the anchors on top of them."""
    points = [Point(params, loss, "model", f"{model_id}: {params:,} parameters, validation loss {loss:.4f}",
                    f"/ui/models/{model_id}") for model_id, params, status, loss in rows
              if loss is not None and status == "ready"]
    points += [Point(a.params, a.metrics["validation_loss"], "source" if a.index == 0 else "anchor",
                     f"{'source' if a.index == 0 else f'anchor {a.index}'}: {a.params:,} parameters, "
                     f"validation loss {a.metrics['validation_loss']:.4f}")
               for a in chain.anchors if a.metrics.get("validation_loss") is not None]
    return size_quality(points, human_params)


_CURVES: dict[str, dict[str, list[tuple[float, float]]]] = {}  # by the file's sha256: content never changes


def anchor_curves(store: ArtifactStore, anchor: Any) -> Chart | None:
    """The anchor's distillation curve (train and dev loss per step) when it has the engine's loss_curve.csv."""
    item = next((f for f in anchor.files if f.name == CURVE_FILE), None)
    if item is None:
        return None
    if item.sha256 not in _CURVES:
        with closing(store.open(item.sha256)) as handle:  # an S3 body is closed, not a context manager
            _CURVES[item.sha256] = read_curve(handle.read().decode())
    return curves(_CURVES[item.sha256])


def read_curve(text: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {"train_loss": [], "dev_loss": []}
    for row in csv.DictReader(io.StringIO(text)):
        for name, column in (("train_loss", "loss"), ("dev_loss", "dev_loss")):
            try:
                series[name].append((float(row["step"]), float(row[column])))
            except (KeyError, TypeError, ValueError):  # an empty cell: not measured at that step
                continue
    return series


def jobs_page(session: Session, principal: Principal, page_token: str | None) -> tuple[list[JobView], str | None]:
    rows, token = paginate(session, select(Job), Job.id, PAGE, page_token)
    return [job_view(principal, job) for job in rows], token


def job_page(session: Session, principal: Principal, job_id: str) -> JobView:
    return job_view(principal, jobs.get_job(session, job_id))


@dataclass(frozen=True)
class ModelView:
    model: ModelOut
    job: JobView | None
    anchors: list[Anchor]  # smaller, larger
    evaluations: list[tuple[str, str, dict]]  # task, metric, {value, ci95}
    links: SignedLinks | None


def model_view(session: Session, settings: Settings, key: bytes, principal: Principal, model_id: str) -> ModelView:
    model = models.get_model(session, model_id)
    out = models.model_out(session, model)
    latest = jobs.latest_job(session, model.id)
    anchors = [session.get(Anchor, anchor_id) for anchor_id in out.anchors]
    evaluations = [(task, name, value) for task, entry in out.metrics.items()
                   if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict)
                   for name, value in entry["metrics"].items() if isinstance(value, dict) and "value" in value]
    signed = (models.signed_links(session, key, settings.signed_link_seconds, model.id)
              if model.status == "ready" else None)
    return ModelView(out, job_view(principal, latest) if latest else None, anchors, evaluations, signed)

