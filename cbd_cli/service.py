"""`cbd serve`, `cbd worker`, `cbd token create|list|revoke`: the REST service, its workers and its tokens.

Flags override the CBD_* environment; they are passed on to child processes through it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI
    from sqlalchemy.orm import Session

    from app.settings import Settings

SETTING_FLAGS = ("data_dir", "database_url", "broker_url", "storage_url", "allowed_source_roots", "auth", "host",
                 "port")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="CBD_DATA_DIR: SQLite database and artifacts (default ./cbd-data)")
    parser.add_argument("--database-url", help="CBD_DATABASE_URL: sqlite:///... or postgresql+psycopg://...")
    parser.add_argument("--broker-url", help="CBD_BROKER_URL: empty for the embedded worker, or redis://...")
    parser.add_argument("--storage-url", help="CBD_STORAGE_URL: file://... or s3://bucket/prefix")
    parser.add_argument("--allowed-source-roots", help="CBD_ALLOWED_SOURCE_ROOTS: colon-separated folders")


def _apply_flags(args: argparse.Namespace) -> None:
    for name in SETTING_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"CBD_{name.upper()}"] = str(value)


class Supervisor:
    """Keeps one child process running (an embedded worker), restarting it when it dies."""

    def __init__(self, command: list[str], name: str):
        self.command, self.name, self.process, self.stopping = command, name, None, False

    def start(self) -> None:
        threading.Thread(target=self._watch, name=f"supervisor-{self.name}", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping:
            self.process = subprocess.Popen(self.command)
            code = self.process.wait()
            if not self.stopping:
                print(f"cbd serve: embedded worker ({self.name}) exited ({code}); restarting", file=sys.stderr)
                time.sleep(1)

    def terminate(self) -> None:
        """Ask the child to stop (its running job goes back to the queue) and restart it no more."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def join(self, timeout: float = 10) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()


def announce_demo_chain(settings: Settings) -> None:
    """Queue the demo chain unless it is being built or ready (a database write: the service listens at once)."""
    from worker.demo import ensure_demo_chain

    chain, job = ensure_demo_chain(settings)
    if chain.status == "ready":
        print(f"cbd serve: the demo chain {chain.id} ({chain.name}) is ready", file=sys.stderr)
        return
    print(f"cbd serve: the demo chain {chain.id} ({chain.name}) is being built; its progress and estimate: "
          f"GET /jobs/{job.id}", file=sys.stderr)


def server_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    """How `cbd serve` listens. uvicorn's own proxy headers are off: it believes X-Forwarded-For from 127.0.0.1 by
    default, which lets any local client pick its address (and its rate limit); the app trusts only
    CBD_TRUSTED_PROXIES."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                          timeout_keep_alive=75, proxy_headers=False)


def serve(args: argparse.Namespace) -> int:
    _apply_flags(args)
    import uvicorn

    from app.db import upgrade_database
    from app.logging import configure_logging
    from app.main import create_app
    from app.settings import Settings

    configure_logging()
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.resolved_database_url)
    if args.demo:
        announce_demo_chain(settings)
    supervisors = []
    if settings.embedded and settings.embedded_worker:
        lanes = [",".join(lane) for lane in settings.embedded_lanes]
        supervisors = [Supervisor([sys.executable, "-m", "worker.embedded", "--kinds", kinds], kinds)
                       for kinds in lanes]
        for supervisor in supervisors:
            supervisor.start()
    if not settings.auth_enabled:
        print(f"cbd serve: authentication is OFF on {settings.host} (CBD_AUTH={settings.auth})", file=sys.stderr)
    print(f"cbd serve: http://{settings.host}:{settings.port} (API docs at /docs)", file=sys.stderr)

    def stop_workers() -> None:  # all at once: each may take a step's time to hand its job back
        for supervisor in supervisors:
            supervisor.terminate()
        for supervisor in supervisors:
            supervisor.join()

    def shut_down(signum: int, frame: object) -> None:
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; stop the workers before leaving
        stop_workers()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    try:
        uvicorn.Server(server_config(settings, create_app(settings))).run()
    finally:
        stop_workers()
    return 0


def worker(args: argparse.Namespace) -> int:
    _apply_flags(args)
    from app.settings import Settings

    settings = Settings()
    if settings.embedded:
        os.execv(sys.executable, [sys.executable, "-m", "worker.embedded"])
    queues = ",".join(args.queue or ["cpu"])
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues,
               "--concurrency", str(args.concurrency), "--loglevel", "INFO", "-n", f"cbd-{queues}@%h"]
    os.execv(sys.executable, command)
    return 0


@contextlib.contextmanager
def token_session(args: argparse.Namespace) -> Iterator[Session]:
    """A session on the service's database (as its flags and environment name it), migrated first."""
    _apply_flags(args)
    from app.db import make_engine, make_session_factory, upgrade_database
    from app.settings import Settings

    settings = Settings()
    upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def token_create(args: argparse.Namespace) -> int:
    from app.auth import create_token, parse_scopes

    scopes = parse_scopes(args.scopes)
    with token_session(args) as session:
        token, row = create_token(session, scopes, args.name)
    print(token)
    print(f"cbd token create: {row.id} with scopes {','.join(scopes)} (shown once; stored as sha256)", file=sys.stderr)
    return 0


def token_list(args: argparse.Namespace) -> int:
    """One line a token: id, scopes, creation time, name (never the token: only its sha256 is kept)."""
    from app.auth import list_tokens

    with token_session(args) as session:
        for row in list_tokens(session):
            print(f"{row.id}\t{','.join(row.scopes)}\t{row.created_at:%Y-%m-%dT%H:%M:%SZ}\t{row.name}")
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    from app.auth import revoke_token

    with token_session(args) as session:
        if not revoke_token(session, args.id):
            raise ValueError(f"no token {args.id!r} (see cbd token list)")
    print(f"cbd token revoke: {args.id} revoked (API processes refuse it within CBD_TOKEN_CACHE_SECONDS)",
          file=sys.stderr)
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    serve_parser = subcommands.add_parser("serve", help="run the REST service (embedded worker unless a broker is set)")
    _add_setting_flags(serve_parser)
    serve_parser.add_argument("--host", help="CBD_HOST (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="CBD_PORT (default 8000)")
    serve_parser.add_argument("--auth", choices=["on", "off", "auto"], help="CBD_AUTH (auto: off on 127.0.0.1 only)")
    serve_parser.add_argument("--demo", action="store_true",
                              help="build the demo chain (SmolLM2-135M-Instruct and a distilled 90M anchor) unless "
                                   "it is being built or ready")
    serve_parser.set_defaults(func=serve)

    worker_parser = subcommands.add_parser("worker", help="run a worker for the given queues (Celery with a broker)")
    _add_setting_flags(worker_parser)
    worker_parser.add_argument("--queue", action="append", choices=["cpu", "gpu", "npu"], help="repeatable")
    worker_parser.add_argument("--concurrency", type=int, default=1)
    worker_parser.set_defaults(func=worker)

    token_parser = subcommands.add_parser("token", help="manage API tokens")
    token_commands = token_parser.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token; prints it on stdout")
    _add_setting_flags(create)
    create.add_argument("--scopes", required=True, help="comma-separated: read,build,admin")
    create.add_argument("--name", default="")
    create.set_defaults(func=token_create)
    listing = token_commands.add_parser("list", help="list tokens: id, scopes, created, name")
    _add_setting_flags(listing)
    listing.set_defaults(func=token_list)
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id (from cbd token list)")
    _add_setting_flags(revoke)
    revoke.add_argument("id", help="the token's id, tok_...")
    revoke.set_defaults(func=token_revoke)
