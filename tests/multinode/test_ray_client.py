"""`syncbn serve` joined to a cluster through Ray Client (`ray://`), the way the compose stack and the KubeRay
manifests join theirs: a real `ray start --head` on loopback with its own Ray Client server port, free ports, its
own temp dir and token, stopped by pid. A job submitted to the service runs in that cluster, its records reach
the service, it succeeds and its model downloads; cancelling a second one frees its CPUs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from tests.multinode.ray_nodes import TwoNodeCluster
from tests.service.conftest_api import ServeProcess, tiny_spec, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        importlib.util.find_spec("grpc") is None, reason="Ray Client needs grpcio (pip install 'ray[client]')"
    ),
]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    """A one-node cluster (the head only, 2 CPUs) with a Ray Client server on a free port."""
    started = TwoNodeCluster(tmp_path_factory.mktemp("ray-client-head"), with_worker_node=False).start()
    try:
        yield started
    finally:
        started.shutdown()


def test_the_service_runs_jobs_through_ray_client(
    head: TwoNodeCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert head.client_port is not None
    address = f"ray://127.0.0.1:{head.client_port}"
    service = ServeProcess(tmp_path_factory.mktemp("client-service"), "--ray-address", address, env=head.env())
    try:
        service.wait_ready(timeout=120)
        with service.client() as client:
            cluster = client.get("/v1/cluster").json()
            assert cluster["cpus"] == 2.0, cluster
            job = client.post("/v1/jobs", json=tiny_spec(name="through-ray-client")).json()
            done = wait_for(
                lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and j,
                240,
                "the job run through Ray Client to end",
            )
            assert done["status"] == "succeeded", (done, service.log())
            metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
            assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
            assert client.get(f"/v1/jobs/{job['id']}/model").status_code == 200

            long = client.post("/v1/jobs", json=tiny_spec(name="cancelled", epochs=200)).json()
            wait_for(
                lambda: any(
                    line["source"] == "run" for line in client.get(f"/v1/jobs/{long['id']}/logs").json()["data"]
                ),
                120,
                "the second job to start",
            )
            assert client.post(f"/v1/jobs/{long['id']}/cancel").json()["status"] == "cancelled"
            wait_for(lambda: client.get("/v1/cluster").json()["available_cpus"] == 2.0, 60, "the CPUs to come back")
    finally:
        if service.process.poll() is None:
            service.terminate(timeout=30)
