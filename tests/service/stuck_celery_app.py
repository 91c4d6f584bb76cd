"""A Celery app for tests: the worker's real tasks, except that materialize never returns, never checks
`should_stop` and swallows every exception (like work stuck in a C call), so only the hard time limit can end it.
`stuck` is that handler (the embedded worker's hard-limit test runs it too).

`celery -A tests.service.stuck_celery_app worker -Q cpu`
"""

from __future__ import annotations

import time

import worker.tasks
from worker.celery_app import celery  # noqa: F401 - the app Celery loads from this module
from worker.runner import JobContext


def stuck(ctx: JobContext) -> None:
    while True:
        try:
            time.sleep(0.05)
        except BaseException:  # noqa: BLE001, S110 - deaf to Celery's soft limit, on purpose
            pass


worker.tasks.HANDLERS["materialize_model"] = stuck
