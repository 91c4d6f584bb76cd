"""The service's one settings class: environment variables with the prefix CBD_ (CLI flags override them)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# data the engine's package ships (its default calibration set): public and read-only, readable whatever the roots
PACKAGE_DATA = (Path(__file__).parent.parent / "cbd_engine" / "assets").resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBD_", extra="ignore")

    data_dir: Path = Path("./cbd-data")
    database_url: str = ""  # default: sqlite in data_dir
    broker_url: str = ""  # empty: the embedded worker polls the jobs table
    storage_url: str = ""  # default: file:// in data_dir
    s3_endpoint_url: str = ""
    allowed_source_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    auth: Literal["on", "off", "auto"] = "auto"  # auto: off on 127.0.0.1, on elsewhere
    host: str = "127.0.0.1"
    port: int = 8000
    # Host header names served ("*.example.com" and "*" allowed); empty: the loopback names with auth off (a DNS
    # rebinding page must not reach an unauthenticated server), any with auth on
    trusted_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # peers (addresses or networks) whose X-Forwarded-For / X-Forwarded-Proto are believed; empty: nobody's
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # sha256 hex of tokens with their scopes, "hash:read,build;hash2:read" (tokens from `cbd token create` live in
    # the database)
    token_hashes: str = ""
    token_cache_seconds: float = 30.0  # database tokens remembered per API process: a revocation's delay
    max_body_bytes: int = 1 << 20
    rate_limit_per_minute: int = 600  # per token (or per client address with auth off); 0 disables
    max_concurrent_jobs: int = 4  # queued or running jobs per token; 0 disables
    job_budget_seconds: float = 24 * 3600.0
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    soft_time_limit_seconds: float = 48 * 3600.0
    hard_time_limit_seconds: float = 49 * 3600.0
    max_attempts: int = 3  # runs that lose their worker before the job fails instead of running again; 0: no cap
    auto_queue: Literal["cpu", "gpu", "npu"] = "cpu"  # the queue of requests with device "auto"
    embedded_poll_seconds: float = 0.2
    embedded_worker: bool = True  # `cbd serve` starts workers when no broker is configured
    # `cbd serve`'s embedded workers, one process per lane, lanes separated by ";" and job kinds by ",": by default a
    # materialization (seconds) or an evaluation (minutes) never waits behind a chain build (hours). One lane with
    # all kinds runs one job at a time (less memory: a single model-loading process).
    embedded_lanes: Annotated[list[tuple[str, ...]], NoDecode] = Field(
        default_factory=lambda: [("build_chain",), ("materialize_model", "evaluate_model", "export_model")])
    validation_rows: int = 32  # validation rows scored for each new model and anchor
    # a blob no row names is removed only once this old: a worker records a model's rows within it of writing the
    # model's blobs (which another model's delete may name too)
    blob_grace_seconds: float = 6 * 3600.0
    # HMAC key of the short-lived download links (POST /models/{id}/signed-links, the console's downloads); empty: a
    # random key per API process, so set it when several API processes serve one registry
    signing_secret: str = ""
    signed_link_seconds: float = Field(default=300.0, gt=0, le=7 * 24 * 3600.0)  # how long a signed link works
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout_seconds: float = 30.0  # a webhook's whole delivery, retries included (off the job lane)
    materialize_bytes_per_second: float = 150e6  # for job estimates
    # where sources given as Hub ids come from (a mirror, or another factory); empty: huggingface.co
    hub_endpoint: str = ""
    # the only token sent with those downloads; empty: none. The worker's own HF_TOKEN or login is never sent: any
    # `build` token holder could otherwise fetch every private or gated repository that credential reads
    hub_token: SecretStr = SecretStr("")
    max_source_bytes: int = 20 << 30  # a source's weights and side files, checked before a Hub download
    max_dataset_bytes: int = 2 << 30  # a data set's files: the engine reads a data set whole into memory

    @field_validator("allowed_source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: str | list) -> list[Path]:
        items = value.split(os.pathsep) if isinstance(value, str) else value
        return [Path(p).resolve() for p in items if str(p)]

    @field_validator("trusted_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _split_names(cls, value: str | list) -> list[str]:
        items = value.split(",") if isinstance(value, str) else value
        return [item.strip().lower() for item in items if item.strip()]

    @field_validator("embedded_lanes", mode="before")
    @classmethod
    def _split_lanes(cls, value: str | list) -> list[tuple[str, ...]]:
        from app.schemas import JobKind

        known = get_args(JobKind)
        lanes = [lane.split(",") for lane in value.split(";")] if isinstance(value, str) else value
        lanes = [tuple(kind.strip() for kind in lane if kind.strip()) for lane in lanes]
        kinds = [kind for lane in lanes for kind in lane]
        if sorted(kinds) != sorted(known):  # a kind in no lane would never run
            raise ValueError(f"embedded lanes must name each job kind once ({', '.join(known)}), as in "
                             f"'build_chain;materialize_model,evaluate_model,export_model'; got {value!r}")
        return lanes

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'cbd.sqlite3').resolve()}"

    @cached_property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "artifacts").resolve().as_uri()

    @property
    def auth_enabled(self) -> bool:
        if self.auth == "auto":
            return self.host not in LOOPBACK_NAMES
        return self.auth == "on"

    @property
    def source_roots(self) -> list[Path]:
        """Where user-given paths may lead: CBD_ALLOWED_SOURCE_ROOTS, and the package's own data."""
        return [*self.allowed_source_roots, PACKAGE_DATA]

    @property
    def served_hosts(self) -> list[str]:
        return self.trusted_hosts or (["*"] if self.auth_enabled else list(LOOPBACK_NAMES))

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def rate_limit_redis_url(self) -> str:
        """Where the rate limit's windows live when several API processes share them: the broker, when it is
        Redis; empty (process memory) otherwise."""
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else ""

    @property
    def work_dir(self) -> Path:
        """Scratch space of workers: anchor folders and outputs before they are published."""
        return self.data_dir / "work"
