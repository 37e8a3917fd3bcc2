"""deploy/compose.yaml (and its GPU override) checked for structure, without a Docker engine.

Proves that the one-machine stack has a Ray head, Ray workers joined to it, Postgres and the service; that the
service's environment points at the head's Ray Client port and at the Postgres service with its user and
database; that every container has a health check and the service starts only after its dependencies are
healthy; that the service and the Ray nodes share one image and one volume at the service's data folder; that
nothing is published beyond loopback; and that compose refuses to start without API tokens. Where a `docker`
CLI with the compose plugin exists, `docker compose config` also validates both files against the Compose spec.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.manifests import (
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    DEPLOY_DIR,
    MissingVariableError,
    interpolate,
    load_documents,
    project_version,
)

pytestmark = pytest.mark.timeout(120)

#: What a user exports before `docker compose up` (see the file's header).
USER_ENV = {"SYNCBN_API_TOKENS": "a-token-of-thirty-two-characters"}


def _compose() -> dict[str, Any]:
    (doc,) = load_documents(COMPOSE_FILE)
    return doc


def _flags(command: list[str]) -> dict[str, str]:
    """`--name=value` arguments of a command as {name: value} (bare flags map to "")."""
    flags = {}
    for arg in command:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            flags[name] = value
    return flags


def _env(service: dict[str, Any], env: dict[str, str] = USER_ENV) -> dict[str, str]:
    return {key: interpolate(str(value), env) for key, value in service.get("environment", {}).items()}


def test_stack_has_head_workers_postgres_and_service() -> None:
    services = _compose()["services"]
    assert {"ray-head", "ray-worker", "postgres", "syncbn"} <= services.keys()
    assert services["ray-worker"]["deploy"]["replicas"] >= 1


def test_ray_head_is_cpu_only_and_workers_join_it() -> None:
    services = _compose()["services"]
    head = _flags(services["ray-head"]["command"])
    assert services["ray-head"]["command"][:2] == ["ray", "start"] and "head" in head and "block" in head
    assert head["num-cpus"] == "0"
    worker = _flags(services["ray-worker"]["command"])
    assert worker["address"] == f"ray-head:{head['port']}"
    assert "block" in worker
    assert int(interpolate(worker["num-cpus"], {})) >= 1


def test_service_points_at_the_head_and_postgres() -> None:
    services = _compose()["services"]
    head = _flags(services["ray-head"]["command"])
    env = _env(services["syncbn"])
    assert env["SYNCBN_RAY_ADDRESS"] == f"ray://ray-head:{head['ray-client-server-port']}"

    url = urlsplit(env["SYNCBN_DATABASE_URL"])
    postgres = _env(services["postgres"])
    assert url.scheme == "postgresql+psycopg", "psycopg 3 is the driver the images install"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == f"/{postgres['POSTGRES_DB']}"


def test_database_password_follows_the_users_choice() -> None:
    services = _compose()["services"]
    env = {**USER_ENV, "SYNCBN_DB_PASSWORD": "s3cret-from-the-user"}
    assert urlsplit(_env(services["syncbn"], env)["SYNCBN_DATABASE_URL"]).password == "s3cret-from-the-user"
    assert _env(services["postgres"], env)["POSTGRES_PASSWORD"] == "s3cret-from-the-user"


def test_compose_refuses_to_start_without_api_tokens() -> None:
    with pytest.raises(MissingVariableError, match="SYNCBN_API_TOKENS"):
        _env(_compose()["services"]["syncbn"], env={})


def test_every_container_has_a_health_check_and_the_service_waits_for_healthy_dependencies() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    for name in ("ray-head", "postgres"):
        assert services["syncbn"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_ray_health_checks_probe_the_ports_ray_listens_on() -> None:
    services = _compose()["services"]
    head = _flags(services["ray-head"]["command"])
    head_url = services["ray-head"]["healthcheck"]["test"][-1]
    assert urlsplit(head_url).port == int(head["dashboard-port"]) and head_url.endswith("/api/gcs_healthz")
    worker_url = services["ray-worker"]["healthcheck"]["test"][-1]
    assert worker_url.endswith("/api/local_raylet_healthz")
    assert services["syncbn"]["healthcheck"]["test"] == ["CMD", "syncbn-healthcheck"]


def test_service_and_ray_nodes_share_one_image_and_the_data_volume() -> None:
    services = _compose()["services"]
    users = ("ray-head", "ray-worker", "syncbn")
    images = {services[name]["image"] for name in users}
    assert images == {f"syncbn:{project_version()}-cpu"}, f"one image for every Ray node and the service: {images}"
    dockerfile = DEPLOY_DIR / services["syncbn"]["build"]["context"] / services["syncbn"]["build"]["dockerfile"]
    assert dockerfile.resolve().is_file(), f"build points at a missing Dockerfile: {dockerfile}"
    data_dir = _env(services["syncbn"])["SYNCBN_DATA_DIR"]
    for name in users:
        assert f"shared:{data_dir}" in services[name]["volumes"], f"{name}: shared volume not at {data_dir}"
    assert "shared" in _compose()["volumes"]


def test_ports_are_published_on_loopback_only() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert interpolate(port, {}).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_gpu_override_switches_every_syncbn_container_to_the_cuda_image() -> None:
    (override,) = load_documents(COMPOSE_GPU_FILE)
    base = _compose()["services"]
    users = {name for name, s in base.items() if s.get("image", "").startswith("syncbn:")}
    images = {name: override["services"][name]["image"] for name in users}
    assert set(images.values()) == {f"syncbn:{project_version()}-cuda"}, images
    reservation = override["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI here to run `docker compose config`")
def test_docker_compose_accepts_both_files() -> None:
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.skip(f"docker has no compose plugin: {version.stderr.strip()}")
    command = ["docker", "compose", "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_GPU_FILE), "config", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **USER_ENV})
    assert result.returncode == 0, result.stderr
