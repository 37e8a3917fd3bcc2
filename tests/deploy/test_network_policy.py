"""deploy/k8s/networkpolicy.yaml, evaluated the way Kubernetes does, against the pods the manifests create.

NetworkPolicy semantics (networking.k8s.io/v1, ingress): a pod selected by no policy accepts everything; a pod
selected by one or more accepts a connection when any rule of any of them matches its source pod and port. The
pods' labels are those of the manifests plus the ones KubeRay adds to its pods (ray.io/cluster, ray.io/node-type,
ray.io/group). Proves that the Ray pods reach each other on every port, that the service reaches the head's Ray
Client port and nothing else of the cluster, and that any other pod reaches neither the head's ports nor the workers.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.manifests import find_object, k8s_objects

pytestmark = pytest.mark.timeout(60)

#: Labels of a pod that is neither the service nor part of the Ray cluster (anything else in the namespace).
INTRUDER = {"app.kubernetes.io/name": "something-else"}
#: A port a Ray worker listens on (object manager, worker gRPC, gloo or NCCL rendezvous: Ray picks many).
SOME_WORKER_PORT = 12345


def _policies() -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == "NetworkPolicy"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is evaluated here, got {sorted(selector)}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict[str, Any], source: dict[str, str]) -> bool:
    # Every pod here lives in the syncbn namespace: a peer without namespaceSelector means that namespace.
    assert set(peer) == {"podSelector"}, f"only same-namespace podSelector peers are evaluated, got {sorted(peer)}"
    return _selects(peer["podSelector"], source)


def allowed(policies: list[dict[str, Any]], source: dict[str, str], target: dict[str, str], port: int) -> bool:
    """Whether a pod labelled `source` may open a TCP connection to `port` of a pod labelled `target`."""
    selecting = [
        p for p in policies if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            if (peers is None or any(_peer_matches(peer, source) for peer in peers)) and (
                ports is None or any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports)
            ):
                return True
    return False


def _pods() -> dict[str, dict[str, str]]:
    """Labels of the head pod, a worker pod and the service pod, as they run."""
    raycluster = find_object("RayCluster")
    name = raycluster["metadata"]["name"]
    head = raycluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    group = raycluster["spec"]["workerGroupSpecs"][0]
    worker = group["template"]["metadata"]["labels"]
    service = find_object("Deployment", "syncbn")["spec"]["template"]["metadata"]["labels"]
    return {
        "head": {**head, "ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/group": "headgroup"},
        "worker": {**worker, "ray.io/cluster": name, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]},
        "service": dict(service),
    }


def _head_ports() -> dict[str, int]:
    container = find_object("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_ray_pods_reach_each_other_on_every_port() -> None:
    policies, pods = _policies(), _pods()
    for port in [*_head_ports().values(), SOME_WORKER_PORT]:
        assert allowed(policies, pods["worker"], pods["head"], port), f"worker -> head:{port} blocked"
        assert allowed(policies, pods["head"], pods["worker"], port), f"head -> worker:{port} blocked"
        assert allowed(policies, pods["worker"], pods["worker"], port), f"worker -> worker:{port} blocked"


def test_service_reaches_the_ray_client_port_only() -> None:
    policies, pods, ports = _policies(), _pods(), _head_ports()
    settings = find_object("ConfigMap", "syncbn-settings")["data"]
    client_port = int(settings["SYNCBN_RAY_ADDRESS"].rsplit(":", 1)[1])
    assert ports["client"] == client_port
    assert allowed(policies, pods["service"], pods["head"], client_port), "the service cannot reach Ray Client"
    for name, port in ports.items():
        if name != "client":
            assert not allowed(policies, pods["service"], pods["head"], port), f"service reaches head {name}:{port}"
    assert not allowed(policies, pods["service"], pods["worker"], SOME_WORKER_PORT)


def test_other_pods_reach_no_ray_port() -> None:
    policies, pods = _policies(), _pods()
    for name, port in _head_ports().items():
        assert not allowed(policies, INTRUDER, pods["head"], port), f"any pod reaches the head's {name} port {port}"
    assert not allowed(policies, INTRUDER, pods["worker"], SOME_WORKER_PORT), "any pod reaches the workers"


def test_a_policy_selecting_no_pod_would_be_caught() -> None:
    """The evaluation can fail: with the cluster's name misspelt in the selectors, the head is open to all."""
    broken = _policies()
    for policy in broken:
        policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] = "sycnbn"
    assert allowed(broken, INTRUDER, _pods()["head"], _head_ports()["gcs-server"])
