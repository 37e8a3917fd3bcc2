"""Every refusal of the API is a 4xx with a sentence that names the field or the state, never a 500 or a hang;
the queue, idempotency, pagination and the probes behave as documented.

A real uvicorn server on a free loopback port, with a real local Ray, on an SQLite file and on the real
PostgreSQL server. Scheduling is paused (`max_concurrent_jobs=0`), so submitted jobs stay queued and the tests
take milliseconds; the runs themselves are covered by test_api_jobs.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.settings import Settings
from tests.service.conftest_api import LiveServer, postgres_database, read_events, tiny_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp(f"errors-{request.param}")
    npz_root = data_dir / "npz"
    npz_root.mkdir()
    np.savez(npz_root / "ok.npz", x=np.zeros((32, 1, 8, 8), np.float32), y=np.zeros(32, np.int64))
    outside = tmp_path_factory.mktemp("outside") / "secret.npz"
    np.savez(outside, x=np.zeros((4, 2)), y=np.zeros(4))
    os.symlink(outside, npz_root / "escape.npz")
    with postgres_database() as postgres_url:
        if request.param == "postgres" and postgres_url is None:
            pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, database test)")
        settings = Settings(
            data_dir=data_dir,
            npz_root=npz_root,
            database_url=postgres_url if request.param == "postgres" else None,
            max_concurrent_jobs=0,
            max_body_bytes=4096,
            cancel_wait_s=5,
        )
        with LiveServer(settings) as live:
            yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def refused(response: httpx.Response, status: int, *phrases: str) -> str:
    """Assert a JSON refusal with this status whose detail contains every phrase; return the detail."""
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip()
    for phrase in phrases:
        assert phrase in detail, f"{phrase!r} not in {detail!r}"
    return detail


# -- submission ------------------------------------------------------------------------------------------------


def test_submit_returns_201_with_the_queued_job(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json=tiny_spec())
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and len(job["id"]) == 32 and job["created_at"]
    assert job["spec"]["workers"] == 2 and job["spec"]["optimizer"]["momentum"] == 0.9, "defaults filled in"
    assert job["queue_position"] >= 1 and response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


@pytest.mark.parametrize(
    ("body", "phrases"),
    [
        (tiny_spec(colour="red"), ["colour", "not a known field"]),
        (tiny_spec(workers=0), ["workers", "greater than or equal to 1", "(got 0)"]),
        (tiny_spec(optimizer={"name": "sgd", "lr": -1}), ["optimizer.lr", "greater than 0"]),
        (tiny_spec(model="vgg"), ["model 'vgg' is not a model this service can build", "GET /v1/models"]),
        (tiny_spec(sync_group_size=3), ["sync_group_size must divide workers"]),
        (tiny_spec(dataset={"kind": "npz", "path": "../up.npz"}), ["dataset.path", ".."]),
        (tiny_spec(dataset={"kind": "npz", "path": "/etc/x.npz"}), ["dataset.path", "absolute"]),
        (tiny_spec(epochs="many"), ["epochs", "integer"]),
        ([1, 2, 3], ["JSON object"]),
    ],
    ids=[
        "unknown-field",
        "zero-workers",
        "negative-lr",
        "unknown-model",
        "cross-field",
        "dotdot",
        "absolute",
        "wrong-type",
        "not-an-object",
    ],
)
def test_invalid_specs_are_422_with_a_sentence_naming_the_field(
    client: httpx.Client, body: object, phrases: list[str]
) -> None:
    response = client.post("/v1/jobs", json=body)
    refused(response, 422, *phrases)
    assert response.json()["errors"], "each problem is also listed with its field"


def test_malformed_missing_and_oversized_bodies(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    refused(client.post("/v1/jobs", content=b'{"workers": 2', headers=headers), 422, "not valid JSON")
    refused(client.post("/v1/jobs", content=b"", headers=headers), 422, "body is missing")
    big = {"name": "x" * 50, "padding": "y" * 10_000}
    refused(client.post("/v1/jobs", json=big), 413, "larger than the limit of 4096 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        yield b'{"name": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}'

    refused(client.post("/v1/jobs", content=chunks(), headers=headers), 413, "4096 bytes")


@pytest.mark.parametrize(
    ("overrides", "phrases"),
    [
        ({"workers": 64}, ["64 CPUs", "the cluster has 4 CPUs", "lower workers"]),
        ({"workers": 1, "cpus_per_worker": 8}, ["8 CPUs", "the cluster has 4 CPUs"]),
        ({"use_gpu": True}, ["GPUs", "0 GPUs", "use_gpu"]),
    ],
    ids=["too-many-workers", "too-many-cpus", "no-gpu"],
)
def test_a_job_that_can_never_fit_is_refused_with_what_the_cluster_has(
    client: httpx.Client, overrides: dict, phrases: list[str]
) -> None:
    refused(client.post("/v1/jobs", json=tiny_spec(**overrides)), 422, *phrases)


def test_npz_paths_are_confined_to_the_data_root(client: httpx.Client, server: LiveServer) -> None:
    ok = client.post("/v1/jobs", json=tiny_spec(model="cnn", dataset={"kind": "npz", "path": "ok.npz"}))
    assert ok.status_code == 201, ok.text
    escape = tiny_spec(model="cnn", dataset={"kind": "npz", "path": "escape.npz"})
    refused(client.post("/v1/jobs", json=escape), 422, "outside the data root")
    missing = tiny_spec(model="cnn", dataset={"kind": "npz", "path": "nope/missing.npz"})
    refused(client.post("/v1/jobs", json=missing), 422, "does not exist under the data root")


def test_idempotency_key_replays_the_first_job(client: httpx.Client) -> None:
    key = {"Idempotency-Key": f"retry-{os.urandom(8).hex()}"}
    first = client.post("/v1/jobs", json=tiny_spec(seed=7), headers=key)
    second = client.post("/v1/jobs", json=tiny_spec(seed=7), headers=key)
    assert first.status_code == 201 and second.status_code == 200
    assert second.json()["id"] == first.json()["id"] and second.headers["idempotent-replayed"] == "true"
    refused(client.post("/v1/jobs", json=tiny_spec(seed=8), headers=key), 422, "different request body")
    refused(
        client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "has space"}),
        422,
        "header 'Idempotency-Key'",
    )


# -- reading and changing jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/metrics"),
        ("GET", "/v1/jobs/{id}/layers"),
        ("GET", "/v1/jobs/{id}/layers/bn1"),
        ("GET", "/v1/jobs/{id}/logs"),
        ("GET", "/v1/jobs/{id}/events"),
        ("GET", "/v1/jobs/{id}/model"),
        ("POST", "/v1/jobs/{id}/cancel"),
        ("DELETE", "/v1/jobs/{id}"),
    ],
)
def test_unknown_job_is_404_on_every_route(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path.format(id="0" * 32))
    refused(response, 404, "no job with id '00000000000000000000000000000000'")


def test_listing_is_paginated_and_filtered_by_status(client: httpx.Client) -> None:
    ids = [client.post("/v1/jobs", json=tiny_spec(seed=100 + i)).json()["id"] for i in range(3)]
    everything = client.get("/v1/jobs", params={"limit": 500}).json()
    assert everything["count"] >= 3 and len(everything["data"]) == everything["count"]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in page["data"]] == [ids[2], ids[1]], "newest first"
    assert page["count"] == everything["count"]
    second = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()["data"]
    assert second[0]["id"] == ids[0]
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 500}).json()
    assert all(job["status"] == "queued" for job in queued["data"]) and set(ids) <= {j["id"] for j in queued["data"]}
    positions = [job["queue_position"] for job in queued["data"]]
    assert sorted(positions) == list(range(1, len(positions) + 1))
    refused(client.get("/v1/jobs", params={"status": "done"}), 422, "query parameter 'status'", "'done'")
    refused(client.get("/v1/jobs", params={"limit": 0}), 422, "query parameter 'limit'")
    refused(client.get("/v1/jobs", params={"offset": -1}), 422, "query parameter 'offset'")


def test_cancel_queued_job_then_conflicts(client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json=tiny_spec()).json()
    refused(client.delete(f"/v1/jobs/{job['id']}"), 409, "only finished jobs can be deleted")
    refused(client.get(f"/v1/jobs/{job['id']}/model"), 409, "is queued")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"] == "cancelled before it started" and cancelled.json()["finished_at"]
    refused(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "already ended", "cancelled")
    events = read_events(client, job["id"], timeout=10)
    assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "cancelled"]
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    refused(client.get(f"/v1/jobs/{job['id']}"), 404)


def test_cancelling_moves_the_queue_up(client: httpx.Client) -> None:
    ids = [client.post("/v1/jobs", json=tiny_spec(seed=200 + i)).json()["id"] for i in range(3)]
    before = [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids]
    assert before == sorted(before) and before[1] == before[0] + 1
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    after = [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in ids[1:]]
    assert after == [before[1] - 1, before[2] - 1]


def test_reads_of_a_job_without_records(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=tiny_spec()).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/metrics").json() == {"job_id": job_id, "steps": [], "epochs": []}
    layers = client.get(f"/v1/jobs/{job_id}/layers").json()
    assert layers["step"] is None and layers["layers"] == {} and layers["recorded_steps"] == []
    refused(client.get(f"/v1/jobs/{job_id}/layers", params={"step": 5}), 404, "no layer statistics at step 5")
    refused(client.get(f"/v1/jobs/{job_id}/layers/stem.1"), 404, "no statistics for layer 'stem.1'")
    refused(client.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": "x"}), 422, "since_step")
    logs = client.get(f"/v1/jobs/{job_id}/logs").json()
    assert logs["count"] == 1 and logs["data"][0]["message"] == "job submitted and queued"
    refused(client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"}), 422, "Last-Event-ID")


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    refused(client.get("/v2/jobs"), 404, "no route GET /v2/jobs", "/v1")
    refused(client.put("/v1/jobs"), 405, "PUT is not allowed")


# -- probes and metrics ----------------------------------------------------------------------------------------


def test_health_readiness_and_prometheus_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert {k: ready[k] for k in ("ready", "database", "ray")} == {"ready": True, "database": "ok", "ray": "ok"}
    assert ready["leading"] and ready["leader"] == ready["replica"], "a single replica leads (SQLite or PostgreSQL)"
    client.get("/v1/jobs")
    text = client.get("/metrics").text
    assert 'syncbn_jobs{status="queued"}' in text and "syncbn_queue_length" in text
    assert "syncbn_leader 1.0" in text and "syncbn_leader_takeovers_total 1.0" in text
    assert "owner=" not in text, "job counts are summed over owners: no metric says whose jobs they are"
    assert 'route="/v1/jobs"' in text and "syncbn_http_request_duration_seconds_bucket" in text
    cluster = client.get("/v1/cluster").json()
    assert cluster["cpus"] == 4 and cluster["max_concurrent_jobs"] == 0 and cluster["queued_jobs"] >= 1


def test_openapi_documents_every_route_and_field(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/layers",
        "/v1/jobs/{job_id}/layers/{layer}",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/model",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths
    spec_schema = schema["components"]["schemas"]["JobCreate"]
    undocumented = [name for name, field in spec_schema["properties"].items() if not field.get("description")]
    assert not undocumented, f"fields without a description: {undocumented}"
    assert client.get("/docs").status_code == 200


def test_store_data_lives_in_the_data_folder(server: LiveServer) -> None:
    if server.settings.database_url is None:
        assert (Path(server.settings.data_dir) / "syncbn.db").is_file()
