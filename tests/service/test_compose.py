"""docker-compose.yml: the production topology (api, gpu worker on the NVIDIA runtime, postgres, redis, volumes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_compose_topology() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) >= {"api", "worker-gpu", "postgres", "redis"}
    for name in ("api", "worker-gpu"):
        env = services[name]["environment"]
        assert env["CBD_DATABASE_URL"].startswith("postgresql+psycopg://") and env["CBD_BROKER_URL"].startswith("redis")
        assert "cbd-data:/data" in services[name]["volumes"]
    assert services["worker-gpu"]["command"][:4] == ["cbd", "worker", "--queue", "gpu"]
    assert services["worker-gpu"]["runtime"] == "nvidia"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--auth" in services["api"]["command"] and "on" in services["api"]["command"]
    assert set(spec["volumes"]) >= {"cbd-data", "pgdata", "redisdata"}


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or the standalone `docker-compose` (Debian's package; .ci/run installs it)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("neither `docker compose` nor `docker-compose` is installed; .ci/run installs docker-compose")
        pytest.skip("no docker compose here")
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.yml"  # the validator really validates
    broken.write_text(COMPOSE.read_text().replace("services:\n", "services:\n  api-typo:\n    imagee: x\n", 1))
    assert subprocess.run([*command, "-f", str(broken), "config", "--quiet"], capture_output=True).returncode != 0
