"""The embedded worker of `cbd serve`: polls the jobs table (no broker) and runs jobs with the same task code.

Run as its own process (`python -m worker.embedded`), supervised and restarted by `cbd serve`.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from app.logging import configure_logging
from worker.runner import SHUTDOWN, claimable_jobs

log = logging.getLogger("cbd.worker")


def serve_forever() -> None:
    from worker.tasks import run, runtime, warm_up

    warm_up()
    settings, session_factory, _, worker_id = runtime()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        SHUTDOWN.set()  # a running job stops at its next step and goes back to the queue

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    log.info("embedded worker %s polling %s", worker_id, settings.resolved_database_url)
    while not stopping and os.getppid() == parent:  # an orphaned worker leaves; its jobs' leases expire
        with session_factory() as session:
            pending = claimable_jobs(session)
        for job_id in pending:
            run(job_id)
            if stopping:
                break
        if not pending:
            time.sleep(settings.embedded_poll_seconds)


if __name__ == "__main__":
    configure_logging()
    serve_forever()
