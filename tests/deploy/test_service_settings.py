"""The settings and job specs that deploy/ hands to the service are ones the service accepts.

Proves that every SYNCBN_* variable set by the images, compose and the Kubernetes manifests names a field of
`service.settings.Settings` (a misspelt variable would be silently ignored), that the settings each deployment
passes build a valid `Settings` with the intended Ray address, data folder and database, that the Secret's
placeholder token is refused (forgetting to replace it stops the service), and that the example job specs
of deploy/README.md validate as `JobSpec`s and fit the clusters they are meant for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import (
    COMPOSE_FILE,
    DEPLOY_DIR,
    DOCKER_DIR,
    find_object,
    interpolate,
    k8s_objects,
    load_documents,
)

pytestmark = pytest.mark.timeout(120)

EXAMPLES_DIR = DEPLOY_DIR / "examples"
#: The example job specs (`study-*.json` are study specs: a job spec is their `base`).
JOB_EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.json") if not p.name.startswith("study-"))
STUDY_EXAMPLES = sorted(EXAMPLES_DIR.glob("study-*.json"))
A_TOKEN = "a-token-of-thirty-two-characters"
#: What a user exports before `docker compose up`: the API tokens and Ray's token.
USER_ENV = {"SYNCBN_API_TOKENS": A_TOKEN, "SYNCBN_RAY_AUTH_TOKEN": "0123456789abcdef" * 4}


@pytest.fixture(scope="module")
def settings_class() -> type:
    module = pytest.importorskip("service.settings", reason="service/settings.py is not importable yet")
    return module.Settings


def _compose_service_env(env: dict[str, str]) -> dict[str, str]:
    (compose,) = load_documents(COMPOSE_FILE)
    raw = compose["services"]["syncbn"]["environment"]
    return {key: interpolate(str(value), env) for key, value in raw.items()}


def _deployment_env() -> dict[str, str]:
    """What the Deployment's container sees: ConfigMap, then the real Secret's keys, then explicit env."""
    container = find_object("Deployment", "syncbn")["spec"]["template"]["spec"]["containers"][0]
    env = dict(find_object("ConfigMap", "syncbn-settings")["data"])
    env.update({"SYNCBN_API_TOKENS": A_TOKEN, "SYNCBN_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/syncbn"})
    # Values from a Secret (RAY_AUTH_TOKEN) are not settings; only literal values are taken here.
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


def _all_syncbn_variables() -> dict[str, str]:
    """{variable: where it is set} for every SYNCBN_* variable set anywhere under deploy/."""
    found: dict[str, str] = {}
    for path in DOCKER_DIR.glob("Dockerfile.*"):
        for name in re.findall(r"\b(SYNCBN_[A-Z0-9_]+)=", path.read_text(encoding="utf-8")):
            if name != "SYNCBN_VERSION":  # a build ARG, never an environment variable of the image
                found[name] = path.name
    for name in _compose_service_env(USER_ENV):
        if name.startswith("SYNCBN_"):  # beside Ray's own RAY_AUTH_* variables
            found[name] = COMPOSE_FILE.name
    for path, doc in k8s_objects():
        names: list[str] = list(doc.get("data", {})) + list(doc.get("stringData", {}))
        if doc["kind"] == "Deployment":
            names += [e["name"] for c in doc["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])]
        found.update({name: path.name for name in names if name.startswith("SYNCBN_")})
    return found


def test_every_syncbn_variable_is_a_settings_field(settings_class: type) -> None:
    fields = set(settings_class.model_fields)
    variables = _all_syncbn_variables()
    assert len(variables) >= 8
    unknown = {name: where for name, where in variables.items() if name.removeprefix("SYNCBN_").lower() not in fields}
    assert not unknown, f"variables that name no Settings field (the service would ignore them): {unknown}"


def _settings_from(env: dict[str, str], settings_class: type, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Settings built the way `syncbn serve` builds it inside the container: from the environment alone."""
    for name in list(os.environ):
        if name.startswith("SYNCBN_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_class()


def test_compose_settings_are_valid(settings_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_compose_service_env(USER_ENV), settings_class, monkeypatch)
    assert settings.ray_address == "ray://ray-head:10001"
    assert settings.data_dir == Path("/data")
    assert settings.api_tokens == [A_TOKEN]
    assert settings.resolved_database_url().startswith("postgresql+psycopg://syncbn:")


def test_kubernetes_settings_are_valid(settings_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_deployment_env(), settings_class, monkeypatch)
    assert settings.ray_address.startswith("ray://syncbn-head-svc.")
    assert settings.host == "0.0.0.0" and settings.api_tokens == [A_TOKEN]
    assert settings.resolved_data_root() == Path("/data/npz")
    assert settings.npz_root is None, "SYNCBN_NPZ_ROOT is deprecated: the manifests set SYNCBN_DATA_ROOT"
    assert settings.ray_join_timeout_s > 0, "a head that is still starting must be waited for"


def test_placeholder_token_stops_the_service(settings_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _deployment_env()
    env["SYNCBN_API_TOKENS"] = find_object("Secret", "syncbn-secrets")["stringData"]["SYNCBN_API_TOKENS"]
    with pytest.raises(ValueError, match="at least 16 characters"):
        _settings_from(env, settings_class, monkeypatch)


def test_open_bind_without_tokens_stops_the_service(settings_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """compose already refuses an unset token (test_compose); the service itself is the second line."""
    env = _compose_service_env(USER_ENV)
    del env["SYNCBN_API_TOKENS"]
    with pytest.raises(ValueError, match="api_tokens"):
        _settings_from(env, settings_class, monkeypatch)


@pytest.fixture(scope="module")
def load_spec_file():
    module = pytest.importorskip("service.spec", reason="service/spec.py is not importable yet")
    return module.load_spec_file


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_example_specs_are_valid_job_specs(path: Path, load_spec_file) -> None:
    spec = load_spec_file(path)
    assert json.loads(path.read_text(encoding="utf-8"))["workers"] >= 2, "the examples are multi-node jobs"
    assert spec.sync_bn


@pytest.mark.parametrize("path", STUDY_EXAMPLES, ids=lambda p: p.name)
def test_example_study_specs_are_valid_study_specs(path: Path) -> None:
    module = pytest.importorskip("service.study_spec", reason="service/study_spec.py is not importable")
    study = module.load_study_file(path)
    assert len(study.arms) >= 2 and study.base.sync_bn is not None


def test_gpu_example_fits_the_gpu_workers_kept_at_min_replicas(load_spec_file) -> None:
    spec = load_spec_file(EXAMPLES_DIR / "synthetic-gpu.json")
    assert spec.use_gpu
    group = find_object("RayCluster")["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    assert spec.workers <= group["minReplicas"] * gpus_per_pod, "the job would wait for the autoscaler"
    assert spec.cpus_per_worker <= cpus_per_pod / gpus_per_pod, "a worker's CPUs do not fit beside its GPU"


def test_cpu_example_fits_the_compose_workers(load_spec_file) -> None:
    spec = load_spec_file(EXAMPLES_DIR / "digits-cpu.json")
    (compose,) = load_documents(COMPOSE_FILE)
    worker = compose["services"]["ray-worker"]
    cpus = int(interpolate(next(a for a in worker["command"] if a.startswith("--num-cpus=")).split("=")[1], {}))
    assert not spec.use_gpu
    assert spec.cpus_per_worker <= cpus
    assert spec.workers * spec.cpus_per_worker <= worker["deploy"]["replicas"] * cpus


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_multi_node_examples_spread_their_workers_over_nodes(path: Path, load_spec_file) -> None:
    """Named "...-nodes": one worker per node, which Ray does only under STRICT_SPREAD (PACK, the default, put
    both ranks of digits-two-nodes-cpu on one compose worker)."""
    spec = load_spec_file(path)
    assert "nodes" in spec.name, f"{path.name}: expected a multi-node example, got the name {spec.name!r}"
    assert spec.placement_strategy == "STRICT_SPREAD", f"{path.name}: {spec.placement_strategy} may share a node"
