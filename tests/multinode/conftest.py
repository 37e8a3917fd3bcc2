"""Fixtures of the multi-node tests: a two-node Ray cluster started with `ray start`, and `syncbn serve` joined to it.

Both live for the whole module (starting Ray twice costs tens of seconds on this machine) and are torn down by
process id even when a test fails: the service first, then every process of both nodes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multinode.ray_nodes import TwoNodeCluster
from tests.service.conftest_api import ServeProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeCluster]:
    """Node "a" (head, 2 CPUs, resource node_a) and node "b" (worker, 2 CPUs, resource node_b)."""
    started = TwoNodeCluster(tmp_path_factory.mktemp("ray-nodes")).start()
    try:
        yield started
    finally:
        started.shutdown()


@pytest.fixture(scope="module")
def service(cluster: TwoNodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`syncbn serve` with its own SQLite database and data folder, joined to the cluster's head by GCS address.

    On one machine a GCS address works for a driver because a raylet runs locally (the head's: Ray picks the head
    when several nodes share the machine); a service in a container joins through `ray://` instead.
    """
    data_dir = tmp_path_factory.mktemp("service-data")
    process = ServeProcess(data_dir, "--ray-address", cluster.address, env=cluster.env())
    try:
        process.wait_ready(timeout=120)
        yield process
    finally:
        if process.process.poll() is None:
            process.terminate(timeout=30)
