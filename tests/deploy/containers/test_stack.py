"""The CPU image run for real: a Ray head, two Ray workers and the service in containers (deploy/compose.yaml's
services, started by tests/deploy/containers/engine.py with docker or podman), locked with Ray's token.

Proves, in this order, on one stack:

- each container's image HEALTHCHECK fits its role (the head's GCS, a worker's raylet, the service);
- Ray's object store sits in /dev/shm (no "/tmp/ray instead of /dev/shm" fallback at the sizes compose gives);
- the service, started together with the head, waits for the head's Ray Client server and joins it (no crash
  into a restart policy: the service runs without one; the Ray nodes keep compose's, since `ray start` gives up
  when its raylet takes over 30 s to register, which a loaded CI machine can cause);
- a client on the stack's network without Ray's token is refused by the GCS ("InvalidAuthToken") and by the
  dashboard's Jobs API (401), while the same request with the token is served;
- deploy/examples/digits-cpu.json (STRICT_SPREAD) runs one rank on each worker container; the worker container
  holding rank 1 is killed mid-run and started again; the job resumes from its checkpoint on the shared volume,
  again one rank per worker, succeeds, and its model downloads from the service, read from the shared volume;
- a stopped Ray node drains within compose's stop_grace_period rather than being SIGKILLed (exit 137).

Runs through `make test-containers` (which sets up podman where it can, builds the image and sets
SYNCBN_CONTAINER_IMAGE); skipped with the reason where that variable is unset, no engine is usable, or the image is
missing. Everything is removed by name at the end, also when a test fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.deploy.containers.engine import ComposeStack, ContainerEngine
from tests.deploy.manifests import DEPLOY_DIR
from tests.service.conftest_api import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("SYNCBN_CONTAINER_IMAGE", "")
WORKERS = ("ray-worker-1", "ray-worker-2")
#: "rank 0 pid 123 on ray-worker-1" in a run's start line (one per attempt).
_PLACED = re.compile(r"rank (\d+) pid \d+ on ([\w.-]+)")


@dataclass
class Stack:
    """The started stack: containers by hostname, the service's URL and the two secrets."""

    compose: ComposeStack
    containers: dict[str, str]
    url: str
    api_token: str
    ray_token: str
    started_at: float

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, headers={"Authorization": f"Bearer {self.api_token}"})


@pytest.fixture(scope="module")
def engine() -> ContainerEngine:
    if not IMAGE:
        pytest.skip(
            "the container test runs through `make test-containers`, which builds the image and sets "
            "SYNCBN_CONTAINER_IMAGE"
        )
    found, why = ContainerEngine.find()
    if found is None:
        pytest.skip(f"no usable container engine: {why}")
    if not found.image_exists(IMAGE):
        pytest.skip(f"image {IMAGE} is not built here (make images)")
    return found


@pytest.fixture(scope="module")
def stack(engine: ContainerEngine) -> Iterator[Stack]:
    api_token, ray_token = secrets.token_urlsafe(32), secrets.token_hex(32)
    compose = ComposeStack(engine, IMAGE, {"SYNCBN_API_TOKENS": api_token, "SYNCBN_RAY_AUTH_TOKEN": ray_token})
    port = free_port()
    try:
        compose.create()
        started_at = time.monotonic()
        containers = {"ray-head": compose.start("ray-head", "ray-head", restart=True)}
        # No Postgres here (no image registry to pull it from): the service keeps SQLite on the shared volume.
        # It starts right away, beside the head, and must wait for the head's Ray Client server by itself.
        containers["syncbn"] = compose.start(
            "syncbn", "syncbn", drop_env=("SYNCBN_DATABASE_URL",), publish=f"127.0.0.1:{port}:8000"
        )
        compose.wait(lambda: engine.healthy(containers["ray-head"])[0], 240, "the Ray head to be healthy")
        for name in WORKERS:
            containers[name] = compose.start("ray-worker", name, restart=True)
        yield Stack(compose, containers, f"http://127.0.0.1:{port}", api_token, ray_token, started_at)
    finally:
        compose.remove()
        leftovers = engine.run("ps", "--all", "--quiet", "--filter", f"name={compose.prefix}", check=False)
        assert not leftovers.stdout.strip(), f"containers left behind: {leftovers.stdout}"


def _ready(stack: Stack) -> bool:
    service = stack.containers["syncbn"]
    assert stack.compose.running(service), (
        f"the service container exited instead of waiting for Ray:\n{stack.compose.engine.logs(service)}"
    )
    try:
        return httpx.get(f"{stack.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _cluster_nodes(stack: Stack) -> int:
    with stack.client() as client:
        return len([n for n in client.get("/v1/cluster").json()["nodes"] if n["cpus"] > 0])


def test_service_joins_the_head_it_started_beside(stack: Stack) -> None:
    stack.compose.wait(lambda: _ready(stack), 420, "the service to join Ray and be ready", interval=2)
    stack.compose.wait(lambda: _cluster_nodes(stack) == 2, 240, "both workers to join the cluster", interval=2)
    log = stack.compose.engine.logs(stack.containers["syncbn"], tail=400)
    assert "syncbn service on" in log, log
    retries = log.count("joining the Ray cluster at ray://ray-head:10001 failed")
    print(
        f"\nservice ready and 2 workers joined {time.monotonic() - stack.started_at:.0f} s after the start "
        f"({retries} failed attempts to join the head before it answered)"
    )


def test_every_container_is_healthy_by_its_role(stack: Stack) -> None:
    for name, container in stack.containers.items():
        healthy, said = stack.compose.engine.healthy(container)
        assert healthy, f"{name}: {said}\n{stack.compose.engine.logs(container)}"


def test_object_store_lives_in_dev_shm(stack: Stack) -> None:
    for name in ("ray-head", *WORKERS):
        log = stack.compose.engine.logs(stack.containers[name], tail=400)
        assert "instead of /dev/shm" not in log, f"{name}: the object store fell back to /tmp:\n{log}"
        shm = stack.compose.exec(stack.containers[name], "df", "--output=size", "-B1", "/dev/shm").stdout.split()
        assert int(shm[-1]) >= 2 * 10**9, f"{name}: /dev/shm is {shm[-1]} bytes, expected compose's 2gb"


_PROBE = """
import json, sys, urllib.error, urllib.request
def status(headers):
    request = urllib.request.Request("http://ray-head:8265/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
print(json.dumps({"without": status({}), "with": status({"Authorization": "Bearer " + sys.argv[1]})}))
import ray
try:
    ray.init(address="ray-head:6379")
    print("JOINED")
except Exception as error:
    print("REFUSED", type(error).__name__, error)
"""


def test_a_client_without_the_token_is_refused(stack: Stack) -> None:
    # A throwaway container of the same image on the stack's network, with no RAY_AUTH_* in its environment.
    output = stack.compose.run_once("python", "-c", _PROBE, stack.ray_token, timeout=240)
    statuses = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert statuses["without"] in (401, 403), f"the Jobs API answered {statuses['without']} without the token"
    assert statuses["with"] == 200, f"the Jobs API answered {statuses['with']} with the token: {output[-2000:]}"
    assert "JOINED" not in output, output[-3000:]
    assert "REFUSED" in output and "InvalidAuthToken" in output, output[-3000:]


def _placements(client: httpx.Client, job_id: str) -> list[dict[int, str]]:
    """Per attempt of the run: {rank: hostname of the container it ran in}."""
    messages = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()["data"]]
    return [
        {int(rank): host for rank, host in _PLACED.findall(m)}
        for m in messages
        if " workers on " in m and "steps per epoch" in m
    ]


def _messages(client: httpx.Client, job_id: str) -> list[str]:
    return [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()["data"]]


def test_strict_spread_job_resumes_after_losing_a_worker_container(stack: Stack) -> None:
    compose, engine = stack.compose, stack.compose.engine
    spec: dict[str, Any] = json.loads((DEPLOY_DIR / "examples" / "digits-cpu.json").read_text(encoding="utf-8"))
    assert spec["placement_strategy"] == "STRICT_SPREAD" and spec["epochs"] >= 3, "the kill must land mid-run"
    with stack.client() as client:
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        started = time.monotonic()

        compose.wait(
            lambda: any("checkpoint after epoch 1 saved" in m for m in _messages(client, job_id)),
            600,
            "the job's first checkpoint",
            interval=0.5,
        )
        first = _placements(client, job_id)[0]
        assert sorted(first.values()) == sorted(WORKERS), f"STRICT_SPREAD: one rank per worker, got {first}"
        victim = first[1]
        engine.run("kill", stack.containers[victim])
        killed = time.monotonic()
        print(f"\nkilled {victim} (rank 1) {killed - started:.0f} s into the job, placement was {first}")
        # The container comes back (as a new Ray node); STRICT_SPREAD needs two workers again. Its restart policy
        # (compose's) may have started it already.
        engine.run("start", stack.containers[victim], check=False)

        def finished() -> dict[str, Any] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = compose.wait(finished, 900, f"job {job_id} to end", interval=2)
        assert job["status"] == "succeeded", (job, _messages(client, job_id)[-20:])
        messages = _messages(client, job_id)
        resumed = [m for m in messages if "resuming after epoch" in m and "from its checkpoint" in m]
        assert len(resumed) == 1, messages
        attempts = _placements(client, job_id)
        assert len(attempts) == 2, attempts
        assert sorted(attempts[1].values()) == sorted(WORKERS), f"after the restart: {attempts[1]}"
        print(
            f"job {job['status']} {time.monotonic() - started:.0f} s after submission, "
            f"{time.monotonic() - killed:.0f} s after the kill; placements per attempt {attempts}; {resumed[0]}"
        )

        model = client.get(f"/v1/jobs/{job_id}/model")
        assert model.status_code == 200, model.text
        import torch

        state = torch.load(io.BytesIO(model.content), map_location="cpu", weights_only=True)
        assert state, "the downloaded model is empty"
    # Written by rank 0 on a worker container, served by the service container: the shared volume.
    listing = compose.exec(stack.containers["syncbn"], "find", "/data/storage", "-name", "*.pt")
    assert job_id in listing.stdout, listing.stdout + listing.stderr


def test_a_stopped_ray_node_drains_within_the_grace_period(stack: Stack) -> None:
    grace = int(stack.compose.compose_service("ray-worker")["stop_grace_period"].rstrip("s"))
    container = stack.containers[WORKERS[0]]
    began = time.monotonic()
    stack.compose.engine.run("stop", "--time", str(grace), container, timeout=grace + 60)
    took = time.monotonic() - began
    code = stack.compose.engine.run("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
    assert code != "137", f"SIGKILLed after {took:.0f} s: Ray needed more than stop_grace_period {grace}s"
    assert took < grace, f"the stop took {took:.0f} s, compose would have SIGKILLed at {grace} s"
    print(f"\n{WORKERS[0]} stopped in {took:.1f} s with exit code {code}")
