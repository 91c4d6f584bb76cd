"""A Celery app for tests: the worker's real tasks, except materialize, whose handler CBD_TEST_MATERIALIZE names:

- `stuck` (the default) never returns, never checks `should_stop` and swallows every exception (like work stuck in
  a C call), so only the hard time limit can end it (the embedded worker's hard-limit test runs it too);
- `slow` works until its job is asked to stop, checking `should_stop` as the engine's loops do.

`CBD_TEST_MATERIALIZE=slow celery -A tests.service.handlers_celery_app worker -Q cpu`
"""

from __future__ import annotations

import os
import time

import worker.tasks
from cbd_engine.spec.progress import Cancelled
from worker.celery_app import celery  # noqa: F401 - the app Celery loads from this module
from worker.runner import JobContext


def stuck(ctx: JobContext) -> None:
    while True:
        try:
            time.sleep(0.05)
        except BaseException:  # noqa: BLE001, S110 - deaf to Celery's soft limit, on purpose
            pass


def slow(ctx: JobContext) -> None:
    while not ctx.should_stop():
        time.sleep(0.05)
    raise Cancelled()


worker.tasks.HANDLERS["materialize_model"] = {"stuck": stuck, "slow": slow}[os.environ.get("CBD_TEST_MATERIALIZE",
                                                                                          "stuck")]
