"""The RayCluster: what KubeRay v1.7.0's schema rejects, and the shape syncbn relies on.

Proves that broken copies of deploy/k8s/raycluster.yaml are rejected by the strict CRD validator (wrong types,
missing required fields, misspelt fields, bad quantities, values outside an enum), and that the cluster has
the promised shape: a CPU-only head, an autoscaled GPU worker group with tolerations, HTTP probes (the images
ship no wget for KubeRay's default exec probes), Ray's version equal to the images', and the service's
SYNCBN_RAY_ADDRESS pointing at the head Service's Ray Client port.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.manifests import constraint_pins, find_object, pod_templates, project_version, schema_errors

pytestmark = pytest.mark.timeout(120)


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["workerGroupSpecs"][0]


def _worker_container(doc: dict[str, Any]) -> dict[str, Any]:
    return _worker(doc)["template"]["spec"]["containers"][0]


def _head(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["headGroupSpec"]


def _gpu_limits(doc: dict[str, Any]) -> dict[str, Any]:
    return _worker_container(doc)["resources"]["limits"]


#: name: (how to break a copy of the RayCluster, a fragment of the error the schema must raise)
BREAKAGES = {
    # rayStartParams values are strings in the CRD; an unquoted 0 is the classic mistake.
    "num-cpus-as-integer": (lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
    "worker-without-maxReplicas": (lambda d: _worker(d).pop("maxReplicas"), "'maxReplicas' is a required property"),
    "replicas-as-string": (lambda d: _worker(d).update(replicas="two"), "'two' is not of type 'integer'"),
    "misspelt-autoscaling-field": (lambda d: d["spec"].update(enableInTreeAutoscalling=1), "enableInTreeAutoscalling"),
    "bad-gpu-quantity": (lambda d: _gpu_limits(d).update({"nvidia.com/gpu": "one"}), "does not match"),
    "unknown-upscaling-mode": (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
    "replicas-beyond-int32": (lambda d: _worker(d).update(maxReplicas=2**31), "is not a 'int32'"),
    "head-without-template": (lambda d: _head(d).pop("template"), "'template' is a required property"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_broken_raycluster_is_rejected(name: str, raycluster: dict[str, Any], raycluster_validator) -> None:
    breakage, expected = BREAKAGES[name]
    broken = copy.deepcopy(raycluster)
    breakage(broken)
    errors = schema_errors(raycluster_validator, broken)
    assert any(expected in e for e in errors), f"expected an error containing {expected!r}, got {errors}"
    # The untouched manifest still passes: the failure above comes from the breakage alone.
    assert schema_errors(raycluster_validator, raycluster) == []


def test_a_minimal_rayjob_is_accepted_and_a_broken_one_rejected(rayjob_validator) -> None:
    """The RayJob schema loads and discriminates too (deploy/ has no RayJob today; jobs go through the service)."""
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "probe"},
        "spec": {"entrypoint": "syncbn train /data/spec.json", "shutdownAfterJobFinishes": True},
    }
    assert schema_errors(rayjob_validator, job) == []
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("not of type 'boolean'" in e for e in schema_errors(rayjob_validator, job))


def test_head_is_cpu_only(raycluster: dict[str, Any]) -> None:
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no training worker may be scheduled on the head"
    for container in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert not any(k.endswith("gpu") for k in container["resources"].get(section, {})), "head asks for a GPU"


def _worker_limits(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_worker_group_is_autoscaled_and_tolerates_gpu_taints(raycluster: dict[str, Any]) -> None:
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    groups = raycluster["spec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if int(_worker_limits(g).get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']}: nothing left to autoscale"
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], "extended resources need requests == limits"
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)


def test_ray_containers_declare_http_probes(raycluster: dict[str, Any]) -> None:
    for group, template in pod_templates(raycluster):
        container = template["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            handler = container[probe]
            assert "httpGet" in handler and "exec" not in handler, f"{group}.{probe}: the images have no wget"
            assert handler["httpGet"]["path"] in {"/api/gcs_healthz", "/api/local_raylet_healthz"}


def test_every_pod_runs_the_cuda_image_of_this_version(raycluster: dict[str, Any]) -> None:
    expected = f"syncbn:{project_version()}-cuda"
    deployment = find_object("Deployment", "syncbn")
    images = {c["image"] for _, t in pod_templates(raycluster) for c in t["spec"]["containers"]}
    images |= {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images == {expected}, f"one image for every Ray node and the service, expected {expected}, got {images}"


def test_ray_version_matches_the_images() -> None:
    raycluster = find_object("RayCluster")
    pinned = constraint_pins()["ray"]
    assert raycluster["spec"]["rayVersion"] == pinned, (
        f"rayVersion {raycluster['spec']['rayVersion']} differs from ray=={pinned} in deploy/docker/constraints.txt"
    )


def test_service_joins_the_head_through_ray_client(raycluster: dict[str, Any]) -> None:
    """A driver in its own pod has no local raylet, so it must use ray:// (the Ray Client server), not GCS."""
    head_container = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    name, namespace = raycluster["metadata"]["name"], raycluster["metadata"]["namespace"]
    expected = f"ray://{name}-head-svc.{namespace}.svc.cluster.local:{ports['client']}"
    address = find_object("ConfigMap", "syncbn-settings")["data"]["SYNCBN_RAY_ADDRESS"]
    assert address == expected


def test_ray_token_auth_shares_one_secret_with_the_service(raycluster: dict[str, Any]) -> None:
    """KubeRay (authOptions) hands every Ray container RAY_AUTH_MODE=token and the Secret's auth_token; the service
    must hold the same token, or the head refuses its Ray Client connection."""
    auth = raycluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    container = find_object("Deployment", "syncbn")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (auth["secretName"], "auth_token"), "KubeRay reads the key auth_token"
    template = find_object("Secret", auth["secretName"])
    assert "CHANGE-ME" in template["stringData"]["auth_token"], "the committed Secret holds a placeholder only"


def test_unknown_auth_mode_is_rejected(raycluster: dict[str, Any], raycluster_validator) -> None:
    broken = copy.deepcopy(raycluster)
    broken["spec"]["authOptions"]["mode"] = "tokens"
    assert any("is not one of" in e for e in schema_errors(raycluster_validator, broken))
