"""The sending half of the Celery app: the API enqueues jobs by task name through it and never imports the tasks
(or torch). The worker builds its own app from the same configuration (worker/celery_app.py), so
`celery -A worker.celery_app worker -Q gpu` (or `cbd worker --queue gpu`) runs the tasks of worker.tasks.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.settings import Settings

QUEUES = ("cpu", "gpu", "npu")
TASK_NAMES = {"build_chain": "cbd.build_chain", "materialize_model": "cbd.materialize_model",
              "evaluate_model": "cbd.evaluate_model", "export_model": "cbd.export_model"}


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """The configuration both halves share; `include`: the modules whose tasks a worker runs (none to send)."""
    app = Celery("cbd", broker=settings.broker_url or "memory://", include=list(include))
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="cpu",
        task_acks_late=True,  # a message is acknowledged when its job is done, not when it starts
        task_reject_on_worker_lost=True,  # a killed worker's message goes back to the queue
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # the jobs table is the source of truth, not a result backend
        # the job's own limits (worker.runner) come first, the same as in the embedded worker: the soft one at the
        # engine's next should_stop check, the hard one fails the job and ends the process; Celery's are backstops
        task_soft_time_limit=settings.soft_time_limit_seconds + 60,
        task_time_limit=settings.hard_time_limit_seconds + 60,
        # Redis redelivers unacknowledged messages after this; the job's lease (not this timeout) keeps a
        # multi-hour job from running twice, and the sweeper re-sends jobs whose lease expired.
        broker_transport_options={"visibility_timeout": max(3600, int(settings.lease_seconds * 4))},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # the API sends after committing a job; a broker that is down must not hang the request (the sweeper resends)
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache(maxsize=4)
def celery_for(broker_url: str) -> Celery:
    return make_celery(Settings(broker_url=broker_url))


def send_job(settings: Settings, kind: str, job_id: str, queue: str) -> None:
    celery_for(settings.broker_url).send_task(TASK_NAMES[kind], args=[job_id], queue=queue)


def broker_ping(settings: Settings) -> None:
    with celery_for(settings.broker_url).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
