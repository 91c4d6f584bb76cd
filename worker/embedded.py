"""The embedded worker of `cbd serve`: polls the jobs table (no broker) and runs jobs with the same task code.

Run as its own process (`python -m worker.embedded [--kinds build_chain]`), one per lane of
`CBD_EMBEDDED_LANES`, supervised and restarted by `cbd serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from app.logging import configure_logging, masked_url
from worker.runner import SHUTDOWN, claimable_jobs

log = logging.getLogger("cbd.worker")


def serve_forever(kinds: tuple[str, ...] | None = None) -> None:
    """Run the claimable jobs of these kinds (all when None), one at a time, until asked to stop."""
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
    log.info("embedded worker %s polling %s for %s", worker_id, masked_url(settings.resolved_database_url),
             ", ".join(kinds) if kinds else "every job kind")
    while not stopping and os.getppid() == parent:  # an orphaned worker leaves; its jobs' leases expire
        with session_factory() as session:
            pending = claimable_jobs(session, kinds=kinds)
        for job_id in pending:
            run(job_id)
            if stopping:
                break
        if not pending:
            time.sleep(settings.embedded_poll_seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m worker.embedded")
    parser.add_argument("--kinds", help="comma-separated job kinds to run (default: all)")
    args = parser.parse_args()
    configure_logging()
    serve_forever(tuple(args.kinds.split(",")) if args.kinds else None)
