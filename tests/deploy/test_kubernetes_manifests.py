"""deploy/k8s against the schemas a cluster would apply, offline.

Proves that every object under deploy/k8s would be accepted by the Kubernetes API server under strict field
validation (core kinds: the Kubernetes OpenAPI schemas bundled in `kubernetes-validate`; KubeRay kinds:
KubeRay v1.7.0's own CRD schemas from ../shared/schemas), that the pod templates embedded in the RayCluster are
valid Kubernetes pod templates too, and that the validators reject broken copies (so a pass means something).
It also checks how the objects refer to each other: namespace, Secret and ConfigMap names, the claim, the
Service selector, probes and the non-root security settings.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    DOCKER_DIR,
    K8S_DIR,
    find_object,
    k8s_manifest_files,
    k8s_objects,
    load_documents,
    pod_templates,
    schema_errors,
)

#: Oldest Kubernetes release we claim to support, and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
KUBERAY_KINDS = {"RayCluster", "RayJob"}
NAMESPACE = "syncbn"

pytestmark = pytest.mark.timeout(120)


def _core_errors(document: dict[str, Any], version: str) -> str | None:
    """None when `document` validates strictly against Kubernetes `version`, else the reason."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "(root)"
        return f"{path}: {error.message}"
    return None


def _object_id(path_and_doc: tuple[Any, dict[str, Any]]) -> str:
    path, doc = path_and_doc
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


OBJECTS = k8s_objects()


def test_manifests_exist() -> None:
    kinds = {doc["kind"] for _, doc in OBJECTS}
    expected = {"Namespace", "PersistentVolumeClaim", "RayCluster", "ConfigMap", "Secret", "Deployment", "Service"}
    assert expected <= kinds, f"deploy/k8s lacks {sorted(expected - kinds)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path_and_doc", [o for o in OBJECTS if o[1]["kind"] not in KUBERAY_KINDS], ids=_object_id)
def test_core_objects_validate_against_kubernetes_schemas(
    path_and_doc: tuple[Any, dict[str, Any]], version: str
) -> None:
    _, doc = path_and_doc
    try:
        problem = _core_errors(doc, version)
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(f"no Kubernetes schema for {doc['apiVersion']}/{doc['kind']}: {error.message}")
    assert problem is None, f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {problem}"


def test_kuberay_objects_validate_against_crd_schemas(raycluster_validator, rayjob_validator) -> None:
    validators = {"RayCluster": raycluster_validator, "RayJob": rayjob_validator}
    checked = 0
    for path, doc in OBJECTS:
        if doc["kind"] not in KUBERAY_KINDS:
            continue
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: expected apiVersion ray.io/v1, got {doc['apiVersion']}"
        errors = schema_errors(validators[doc["kind"]], doc)
        assert not errors, f"{path.name}: {doc['kind']} rejected by KubeRay v1.7.0's CRD schema:\n" + "\n".join(errors)
        checked += 1
    assert checked >= 1, "no RayCluster found under deploy/k8s"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_raycluster_pod_templates_are_valid_kubernetes_pod_templates(raycluster: dict[str, Any], version: str) -> None:
    """The CRD embeds the pod schema of the Kubernetes release KubeRay was built against; checking the templates
    as core PodTemplates also covers the releases we claim to support."""
    for group, template in pod_templates(raycluster):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        problem = _core_errors(wrapped, version)
        assert problem is None, f"pod template of group {group!r} is invalid for Kubernetes {version}: {problem}"


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda d: d["spec"].update(replicas="one"), "replicas"),
        (lambda d: _container(d).update(imagePullPolcy="Always"), "imagePullPolcy"),
        (lambda d: _container(d).pop("name"), "name"),
        (lambda d: _container(d)["ports"][0].update(containerPort="http"), "containerPort"),
    ],
    ids=["replicas-as-string", "misspelt-field", "container-without-name", "port-as-string"],
)
def test_broken_deployment_is_rejected(breakage, expected: str) -> None:
    broken = copy.deepcopy(find_object("Deployment"))
    breakage(broken)
    problem = _core_errors(broken, KUBERNETES_VERSIONS[-1])
    assert problem is not None and expected in problem, f"expected a complaint about {expected!r}, got {problem!r}"


def test_every_object_lives_in_the_syncbn_namespace() -> None:
    assert find_object("Namespace")["metadata"]["name"] == NAMESPACE
    for path, doc in OBJECTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, (
                f"{path.name}: {doc['kind']}/{doc['metadata']['name']} should be in namespace {NAMESPACE!r}, "
                f"got {doc['metadata'].get('namespace')!r}"
            )


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    (kustomization,) = load_documents(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    secret_files = {p.name for p in k8s_manifest_files() if any(d["kind"] == "Secret" for d in load_documents(p))}
    expected = {p.name for p in k8s_manifest_files()} - secret_files
    assert listed == expected, f"kustomization resources: expected {sorted(expected)}, got {sorted(listed)}"
    assert kustomization["namespace"] == NAMESPACE
    # Applying the placeholder Secret would overwrite real credentials on every `kubectl apply -k`.
    assert not listed & secret_files


def test_secret_holds_only_marked_placeholders() -> None:
    secret = find_object("Secret", "syncbn-secrets")
    assert "data" not in secret, "write placeholders as stringData, never as base64 data"
    values = secret["stringData"]
    assert set(values) == {"SYNCBN_API_TOKENS", "SYNCBN_DATABASE_URL"}
    for key, value in values.items():
        assert "CHANGE-ME" in value, f"{key} must be a placeholder marked CHANGE-ME, got {value!r}"
    assert values["SYNCBN_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert ".invalid:" in values["SYNCBN_DATABASE_URL"], "the placeholder host must never resolve"


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [("deployment/syncbn", find_object("Deployment", "syncbn")["spec"]["template"]["spec"])]
    specs += [(f"raycluster/{group}", t["spec"]) for group, t in pod_templates(find_object("RayCluster"))]
    return specs


@pytest.mark.parametrize(("where", "pod_spec"), _pod_specs(), ids=[w for w, _ in _pod_specs()])
def test_pods_run_unprivileged_as_the_image_user(where: str, pod_spec: dict[str, Any]) -> None:
    # The image's user is the last USER of its Dockerfile (a build stage may run as root: it is thrown away).
    image_uid = {
        int(re.findall(r"^USER (\d+):\d+\s*$", dockerfile.read_text(encoding="utf-8"), re.MULTILINE)[-1])
        for dockerfile in DOCKER_DIR.glob("Dockerfile.*")
    }
    assert len(image_uid) == 1, f"the Dockerfiles should share one numeric USER, got {sorted(image_uid)}"
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True, where
    assert pod_security["runAsUser"] == image_uid.pop(), f"{where}: runAsUser differs from the images' USER"
    assert pod_security["fsGroup"] == pod_security["runAsGroup"], f"{where}: the shared volume must be group-writable"
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", where
    for container in _containers(pod_spec):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, f"{where}/{container['name']}"
        assert security["capabilities"]["drop"] == ["ALL"], f"{where}/{container['name']}"
        assert "privileged" not in security or security["privileged"] is False


def test_service_deployment_wiring() -> None:
    deployment = find_object("Deployment", "syncbn")
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "the service owns the job queue: one replica only"
    assert spec["strategy"]["type"] == "Recreate", "two copies during a rolling update would both start jobs"
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert {"requests", "limits"} <= container["resources"].keys()

    refs = {
        ("ConfigMap", src["configMapRef"]["name"]) if "configMapRef" in src else ("Secret", src["secretRef"]["name"])
        for src in container["envFrom"]
    }
    assert refs == {("ConfigMap", "syncbn-settings"), ("Secret", "syncbn-secrets")}
    for kind, name in refs:
        find_object(kind, name)

    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name in probes:
        assert container[name]["httpGet"]["port"] in port_names

    settings = find_object("ConfigMap", "syncbn-settings")["data"]
    assert int(settings["SYNCBN_PORT"]) == port_names["http"], "the service must listen on the probed port"

    service = find_object("Service", "syncbn")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_shared_claim_is_read_write_many_and_mounted_everywhere_at_the_data_dir() -> None:
    claim = find_object("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every node writes checkpoints: RWX is needed"
    data_dir = find_object("ConfigMap", "syncbn-settings")["data"]["SYNCBN_DATA_DIR"]
    for where, pod_spec in _pod_specs():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        main = pod_spec["containers"][0]
        mounted = {m["mountPath"]: claims.get(m["name"]) for m in main["volumeMounts"]}
        assert mounted.get(data_dir) == claim["metadata"]["name"], (
            f"{where}: expected claim {claim['metadata']['name']} at {data_dir}, got mounts {mounted}"
        )
