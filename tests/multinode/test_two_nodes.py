"""The service on a real two-node Ray cluster: a job's workers spread over both nodes and keep BatchNorm statistics
synchronized across them; losing the worker node mid-run costs a job that allows a failure one restart from its
checkpoint on the remaining node, fails a job that allows none with the failed rank's error as its reason, and
leaves the service up, taking (or clearly refusing) jobs on what is left.

Real parts only: two `ray start` nodes on this machine (their own ports, temp dirs and auth token), the
`syncbn serve` command joined to the head, tiny digits jobs through the REST API. Which node a worker ran on is
read from the processes themselves: each run logs its workers' pids, and every pid descends from one node's
`ray start` (see `ray_nodes.ProcessTracker`). The node is lost the hard way: SIGKILL to all of its processes.

The tests run in order on one cluster and one service: the last two continue after the node loss of the second.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.multinode.ray_nodes import TwoNodeCluster
from tests.service.conftest_api import ServeProcess, tiny_spec, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TERMINAL = ("succeeded", "failed", "cancelled")
#: Process titles of a run's control actors (driver, record log, Ray Train controller).
CONTROL_ACTORS = ("ray::JobDriver", "ray::RecordLog", "ray::TrainController")
#: "2 workers on cpu (rank 0 pid 123 on host, rank 1 pid 456 on host), ..." (one line per attempt of a run)
_WORKER = re.compile(r"rank (\d+) pid (\d+) on ")


def worker_pids(client: httpx.Client, job_id: str) -> list[dict[int, int]]:
    """Per attempt of the run (first, then each restart): `{rank: pid}` from the run's start log lines."""
    lines = client.get(f"/v1/jobs/{job_id}/logs").json()["data"]
    attempts = []
    for line in lines:
        if " workers on " in line["message"] and "steps per epoch" in line["message"]:
            attempts.append({int(rank): int(pid) for rank, pid in _WORKER.findall(line["message"])})
    return attempts


def log_messages(client: httpx.Client, job_id: str) -> list[str]:
    return [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()["data"]]


def wait_until_finished(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends; the service must answer /healthz on every poll meanwhile."""

    def finished() -> dict[str, Any] | None:
        assert client.get("/healthz").status_code == 200
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_for(finished, timeout, f"job {job_id} to end", interval=0.5)


def nodes_of(cluster: TwoNodeCluster, pids: dict[int, int]) -> dict[int, str | None]:
    """`{rank: node name}` of a run's workers."""
    return {rank: cluster.tracker.node_of(pid) for rank, pid in sorted(pids.items())}


def control_actors_on(cluster: TwoNodeCluster, node: str) -> set[str]:
    """Which kinds of run control actors (`CONTROL_ACTORS`) have a process on `node` now."""
    titles = cluster.process_titles(node)
    return {prefix for prefix in CONTROL_ACTORS if any(title.startswith(prefix) for title in titles)}


def test_strict_spread_job_runs_on_both_nodes_with_synchronized_statistics(
    cluster: TwoNodeCluster, service: ServeProcess
) -> None:
    with service.client() as client:
        capacity = client.get("/v1/cluster").json()
        assert len(capacity["nodes"]) == 2 and capacity["cpus"] == 4.0, capacity

        spec = tiny_spec(name="two-nodes", placement_strategy="STRICT_SPREAD", epochs=2, steps_per_epoch=6)
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert created.json()["spec"]["placement_strategy"] == "STRICT_SPREAD"

        started = time.monotonic()
        job = wait_until_finished(client, job_id, timeout=180)
        assert job["status"] == "succeeded" and job["error"] is None, job
        assert job["summary"]["epochs_done"] == 2, job

        attempts = worker_pids(client, job_id)
        assert len(attempts) == 1 and sorted(attempts[0]) == [0, 1], attempts
        placed = nodes_of(cluster, attempts[0])
        assert sorted(placed.values()) == ["a", "b"], f"ranks by node: {placed}"

        latest = client.get(f"/v1/jobs/{job_id}/layers").json()
        assert latest["recorded_steps"] == [2, 4, 6, 8, 10, 12], latest["recorded_steps"]
        for step in latest["recorded_steps"]:
            layers = client.get(f"/v1/jobs/{job_id}/layers", params={"step": step}).json()["layers"]
            assert layers, f"no layer statistics at step {step}"
            for name, layer in layers.items():
                assert layer["synchronized"] is True and layer["ranks"] == 2, (step, name, layer)
                assert layer["ranks_agree"] is True, f"ranks disagree on the global statistics of {name} at {step}"
                counts = layer["per_rank_count"]
                assert len(counts) == 2 and min(counts) > 0 and layer["count"] == sum(counts), (step, name, counts)
        print(f"\ntwo-node STRICT_SPREAD job: {time.monotonic() - started:.1f} s, ranks by node {placed}")


def test_losing_the_worker_node_mid_run(cluster: TwoNodeCluster, service: ServeProcess) -> None:
    """Two jobs share the cluster, each with one worker per node; node b dies mid-run.

    The job allowed one failure restarts from its last checkpoint on node a and succeeds; the job allowed none
    fails with the lost rank's error as its reason. Both runs' control actors stay on the head, and the service
    answers throughout.
    """
    epochs = 8
    resilient_spec = tiny_spec(
        name="restarts",
        placement_strategy="SPREAD",
        epochs=epochs,
        steps_per_epoch=8,
        stats_every=4,
        checkpoint_every=1,
        max_failures=1,
    )
    fragile_spec = tiny_spec(name="no-retries", placement_strategy="SPREAD", epochs=500, steps_per_epoch=8)
    with service.client() as client:
        resilient = client.post("/v1/jobs", json=resilient_spec).json()["id"]
        fragile = client.post("/v1/jobs", json=fragile_spec).json()["id"]
        wait_for(
            lambda: (
                any("checkpoint after epoch 1 saved" in m for m in log_messages(client, resilient))
                and worker_pids(client, fragile)
            ),
            150,
            "the first job's first checkpoint and the second job's workers",
            interval=0.3,
        )
        for job_id in (resilient, fragile):
            placed = nodes_of(cluster, worker_pids(client, job_id)[0])
            assert sorted(placed.values()) == ["a", "b"], f"SPREAD should use both nodes: {placed}"
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        on_a, on_b = control_actors_on(cluster, "a"), control_actors_on(cluster, "b")
        assert on_a == set(CONTROL_ACTORS) and not on_b, f"control actors: {on_a} on the head, {on_b} on node b"

        killed_at = cluster.kill("b")
        assert client.get("/healthz").status_code == 200
        wait_for(
            lambda: len(client.get("/v1/cluster").json()["nodes"]) == 1, 60, "Ray to declare node b dead", interval=0.5
        )
        detected_s = time.monotonic() - killed_at

        failed = wait_until_finished(client, fragile, timeout=120)
        failed_s = time.monotonic() - killed_at
        assert failed["status"] == "failed", failed
        # The reason names a rank and its error: the lost rank's death, or what its peer saw first (gloo's
        # "connection reset" reaches the surviving rank before Ray declares the node dead).
        assert re.fullmatch(r"rank \d+: \w+: .+", failed["error"], flags=re.S), failed["error"]

        job = wait_until_finished(client, resilient, timeout=180)
        ended_s = time.monotonic() - killed_at
        messages = log_messages(client, resilient)
        assert job["status"] == "succeeded" and job["error"] is None, (job, messages[-10:])
        assert job["summary"]["epochs_done"] == epochs, job
        attempts = worker_pids(client, resilient)
        assert len(attempts) == 2, messages
        resumed = [m for m in messages if "resuming after epoch" in m and "from its checkpoint" in m]
        assert len(resumed) == 1, messages
        assert set(nodes_of(cluster, attempts[1]).values()) == {"a"}, nodes_of(cluster, attempts[1])
        lost = [m for m in messages if m.startswith("rank ")]
        assert lost, f"the lost worker's error should be in the job's log: {messages}"
        print(
            f"\nnode loss: Ray declared node b dead after {detected_s:.1f} s; the job without retries failed after "
            f"{failed_s:.1f} s ({failed['error']}); the other restarted on node a "
            f"({resumed[0].split('), ')[-1]}) and succeeded {ended_s:.1f} s after the kill"
        )


def test_service_keeps_serving_on_the_remaining_node(cluster: TwoNodeCluster, service: ServeProcess) -> None:
    if not cluster.nodes["b"].killed:  # run alone: lose the node here
        cluster.kill("b")
    with service.client() as client:
        wait_for(lambda: client.get("/v1/cluster").json()["cpus"] == 2.0, 60, "the cluster to shrink to node a")
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200

        refused = client.post("/v1/jobs", json=tiny_spec(placement_strategy="STRICT_SPREAD"))
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert "STRICT_SPREAD" in detail and "only 1 node(s)" in detail, detail

        too_big = client.post("/v1/jobs", json=tiny_spec(workers=3))
        assert too_big.status_code == 422 and "has 2 CPUs and 0 GPUs in total" in too_big.json()["detail"], too_big.text

        created = client.post("/v1/jobs", json=tiny_spec(name="after-loss", epochs=1, steps_per_epoch=3))
        assert created.status_code == 201, created.text
        job = wait_until_finished(client, created.json()["id"], timeout=150)
        assert job["status"] == "succeeded", job
        placed = nodes_of(cluster, worker_pids(client, job["id"])[0])
        assert set(placed.values()) == {"a"}, placed
