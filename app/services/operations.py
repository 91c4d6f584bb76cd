"""Readiness checks and Prometheus metrics computed from the jobs table (the source of truth) at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job
from app.settings import Settings
from app.storage import ArtifactStore

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def readiness(session: Session, settings: Settings, store: ArtifactStore) -> dict[str, str]:
    """'ok' or the error of each dependency: database, broker, storage."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"error: {error.__class__.__name__}"
    try:
        if settings.broker_url:
            from app.broker import broker_ping

            broker_ping(settings)
        checks["broker"] = "ok" if settings.broker_url else "embedded"
    except Exception as error:  # noqa: BLE001
        checks["broker"] = f"error: {error.__class__.__name__}"
    try:
        store.check()
        checks["storage"] = "ok"
    except Exception as error:  # noqa: BLE001
        checks["storage"] = f"error: {error.__class__.__name__}"
    return checks


class JobsCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session], settings: Settings):
        self.session_factory, self.settings = session_factory, settings

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("cbd_jobs", "Jobs by kind and state", labels=["kind", "state"])
        depth = GaugeMetricFamily("cbd_queue_depth", "Queued jobs per worker queue", labels=["queue"])
        seconds = CounterMetricFamily("cbd_job_duration_seconds", "Total run time of finished jobs (sum and count)",
                                      labels=["kind", "state"])
        with self.session_factory() as session:
            counts = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
            seen = {(kind, state): n for kind, state, n in counts}
            for kind in ("build_chain", "materialize_model", "evaluate_model"):
                for state in JOB_STATES:
                    jobs.add_metric([kind, state], seen.get((kind, state), 0))
            queued = session.execute(select(Job.queue, func.count()).where(Job.status == "queued")
                                     .group_by(Job.queue)).all()
            for queue, n in queued:
                depth.add_metric([queue], n)
            finished = session.execute(select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
                Job.status.in_(("succeeded", "failed")), Job.started_at.is_not(None), Job.finished_at.is_not(None)))
            totals: dict[tuple[str, str], list[float]] = {}
            for kind, state, started, finished_at in finished:
                totals.setdefault((kind, state), []).append((finished_at - started).total_seconds())
        for (kind, state), values in totals.items():
            seconds.add_metric([kind, state], sum(values))
        yield jobs
        yield depth
        yield seconds
        yield from self._histograms(totals)

    @staticmethod
    def _histograms(totals: dict[tuple[str, str], list[float]]) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily

        buckets = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
        names = {"materialize_model": "cbd_materialization_duration_seconds",
                 "build_chain": "cbd_chain_build_duration_seconds"}
        for kind, name in names.items():
            values = totals.get((kind, "succeeded"), [])
            family = HistogramMetricFamily(name, f"Run time of succeeded {kind} jobs")
            cumulative = [(str(b), sum(1 for v in values if v <= b)) for b in buckets] + [("+Inf", len(values))]
            family.add_metric([], cumulative, sum_value=sum(values))
            yield family
