"""deploy/compose.yaml (and its GPU override) checked for structure, without a Docker engine.

Proves that the one-machine stack has a Ray head, Ray workers joined to it, Postgres and the service; that the
service's environment points at the head's Ray Client port and at the Postgres service with its user and
database; that every container has a health check and the service starts only after its dependencies are
healthy; that the service and the Ray nodes share one image and one volume at the service's data folder; that
nothing is published beyond loopback; that compose refuses to start without API tokens or without Ray's token,
which the head, every worker and the service share; that Ray's object store fits in the /dev/shm given; that a
stop leaves Ray time to drain; and that every image is named fully (podman does not default to docker.io).
Where a `docker` CLI with the compose plugin exists, `docker compose config` also validates both files against the
Compose spec.
"""

from __future__ import annotations

import os
import re
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
    load_healthcheck,
    project_version,
)

pytestmark = pytest.mark.timeout(120)

url_for_command = load_healthcheck().url_for_command

#: What a user exports before `docker compose up` (see the file's header).
USER_ENV = {"SYNCBN_API_TOKENS": "a-token-of-thirty-two-characters", "SYNCBN_RAY_AUTH_TOKEN": "0123456789abcdef" * 4}
#: Ray's drain on SIGTERM: a container stopped with less grace than this is SIGKILLed (exit 137) mid-drain.
RAY_DRAIN_S = 30


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
    env = {k: v for k, v in USER_ENV.items() if k != "SYNCBN_API_TOKENS"}
    with pytest.raises(MissingVariableError, match="SYNCBN_API_TOKENS"):
        _env(_compose()["services"]["syncbn"], env=env)


def test_compose_refuses_to_start_without_the_ray_token() -> None:
    services = _compose()["services"]
    env = {k: v for k, v in USER_ENV.items() if k != "SYNCBN_RAY_AUTH_TOKEN"}
    for name in ("ray-head", "ray-worker", "syncbn"):
        with pytest.raises(MissingVariableError, match="SYNCBN_RAY_AUTH_TOKEN"):
            _env(services[name], env=env)


def test_head_workers_and_service_share_one_ray_token() -> None:
    services = _compose()["services"]
    envs = {name: _env(services[name]) for name in ("ray-head", "ray-worker", "syncbn")}
    for name, env in envs.items():
        assert env["RAY_AUTH_MODE"] == "token", f"{name}: token authentication is off"
        assert env["RAY_AUTH_TOKEN"] == USER_ENV["SYNCBN_RAY_AUTH_TOKEN"], f"{name} holds another token"


def _bytes(size: str) -> int:
    """A compose byte size (2gb, 512m, 1500000000) in bytes."""
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size.strip().lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


@pytest.mark.parametrize("name", ["ray-head", "ray-worker"])
def test_ray_object_store_fits_in_the_shm_given(name: str) -> None:
    """Ray sizes its object store at 30 % of the machine's memory unless told; above /dev/shm it falls back to
    /tmp/ray ("The object store is using /tmp/ray instead of /dev/shm")."""
    service = _compose()["services"][name]
    shm = _bytes(interpolate(service["shm_size"], {}))
    store = int(interpolate(_flags(service["command"])["object-store-memory"], {}))
    assert 75 * 2**20 <= store < shm, f"{name}: object store {store} B does not fit in shm_size {shm} B"
    assert store + 256 * 2**20 <= shm, f"{name}: leave /dev/shm room beside the object store (got {shm - store} B)"


def test_stops_leave_ray_time_to_drain() -> None:
    for name in ("ray-head", "ray-worker", "syncbn"):
        grace = _compose()["services"][name]["stop_grace_period"]
        seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
        assert seconds > RAY_DRAIN_S, f"{name}: stop_grace_period {grace} cuts Ray's {RAY_DRAIN_S} s drain short"


def test_every_image_is_fully_qualified_or_built_here() -> None:
    for name, service in _compose()["services"].items():
        image = service["image"]
        if "build" in service:
            continue  # built by compose itself under a local name
        assert image.split("/")[0] in ("docker.io", "quay.io", "ghcr.io"), f"{name}: {image} is a short name"


def test_service_uses_data_root_not_its_deprecated_name() -> None:
    env = _env(_compose()["services"]["syncbn"])
    assert "SYNCBN_NPZ_ROOT" not in env, "SYNCBN_NPZ_ROOT is deprecated (a warning at every start)"
    assert env["SYNCBN_DATA_ROOT"].startswith(env["SYNCBN_DATA_DIR"] + "/"), "data sets live on the shared volume"


def test_every_container_has_a_health_check_and_the_service_waits_for_healthy_dependencies() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    for name in ("ray-head", "postgres"):
        assert services["syncbn"]["depends_on"][name]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_ray_health_checks_probe_the_ports_ray_listens_on() -> None:
    """Each container's probe is the image's role-fitting one: its URL comes from the container's command."""
    services = _compose()["services"]
    for name in ("ray-head", "ray-worker", "syncbn"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "syncbn-healthcheck"], name
    head = _flags(services["ray-head"]["command"])
    head_url = url_for_command(services["ray-head"]["command"])
    assert urlsplit(head_url).port == int(head["dashboard-port"]) and head_url.endswith("/api/gcs_healthz")
    assert url_for_command(services["ray-worker"]["command"]).endswith(":52365/api/local_raylet_healthz")
    assert url_for_command(services["syncbn"]["command"]).endswith(":8000/healthz")


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
