"""Users who own their jobs: each token names a principal, a job belongs to the principal that submitted it, and
another principal's job does not exist for you: every route answers the same 404 as for an unknown id (never a
403 that would confirm it exists), listings, queue positions and the queue counts of /v1/cluster show only your
own jobs, and idempotency keys are per principal. Principals named in `admins` see and manage every job; a bare
token is the principal "default". GET /v1/whoami says who you are.

A real uvicorn server with a real local Ray; scheduling is paused (max_concurrent_jobs=0), so the jobs stay
queued and nothing trains.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.service.conftest_api import LiveServer, tiny_spec

pytestmark = pytest.mark.timeout(120)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ROOT = "root-token-0123456789abcdefg"
BARE = "bare-token-0123456789abcdefg"

#: (method, path template, body): every route that names a job.
JOB_ROUTES = [
    ("GET", "/v1/jobs/{id}", None),
    ("GET", "/v1/jobs/{id}/metrics", None),
    ("GET", "/v1/jobs/{id}/layers", None),
    ("GET", "/v1/jobs/{id}/layers/bn1", None),
    ("GET", "/v1/jobs/{id}/events", None),
    ("GET", "/v1/jobs/{id}/logs", None),
    ("GET", "/v1/jobs/{id}/model", None),
    ("POST", "/v1/jobs/{id}/cancel", None),
    ("DELETE", "/v1/jobs/{id}", None),
]


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("owners"),
        api_tokens=[f"alice={ALICE}", f"bob={BOB}", f"root={ROOT}", BARE],
        admins=["root"],
        max_concurrent_jobs=0,
        cancel_wait_s=0,
    )
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def jobs(server: LiveServer) -> dict[str, str]:
    """One queued job of alice and one of bob: {principal: job id}."""
    ids = {}
    for name, token in (("alice", ALICE), ("bob", BOB)):
        with server.client(token=token) as client:
            response = client.post("/v1/jobs", json=tiny_spec(name=f"{name}-job"))
            assert response.status_code == 201, response.text
            assert response.json()["owner"] == name
            ids[name] = response.json()["id"]
    return ids


def _request(client: httpx.Client, method: str, path: str) -> httpx.Response:
    if path.endswith("/events"):
        with client.stream(method, path, timeout=httpx.Timeout(10, connect=5)) as response:
            if response.status_code == 200:
                next(response.iter_lines())  # the stream is open; the job is queued, so it does not end by itself
            else:
                response.read()
            return response
    return client.request(method, path)


@pytest.mark.parametrize(("method", "template", "body"), JOB_ROUTES, ids=[f"{m} {p}" for m, p, _ in JOB_ROUTES])
def test_another_principals_job_is_a_404_like_an_unknown_id(
    server: LiveServer, jobs: dict[str, str], method: str, template: str, body: None
) -> None:
    alice_job = jobs["alice"]
    unknown = uuid.uuid4().hex
    for token in (BOB, BARE):
        with server.client(token=token) as other:
            foreign = _request(other, method, template.format(id=alice_job))
            missing = _request(other, method, template.format(id=unknown))
        assert foreign.status_code == 404, (token, foreign.text)
        assert missing.status_code == 404
        assert foreign.json()["detail"].replace(alice_job, unknown) == missing.json()["detail"], (
            "the 404 of another principal's job must read exactly like the 404 of an id that does not exist"
        )
    with server.client(token=ALICE) as owner:
        job = owner.get(f"/v1/jobs/{alice_job}").json()
        assert job["status"] == "queued", "the other principals' requests changed nothing"


def test_the_owner_and_admins_reach_every_route(server: LiveServer, jobs: dict[str, str]) -> None:
    """The same routes answer the owner and an admin with what the job's state allows (never 404)."""
    for token in (ALICE, ROOT):
        with server.client(token=token) as client:
            for method, template, _ in JOB_ROUTES:
                if method != "GET":
                    continue
                response = _request(client, method, template.format(id=jobs["alice"]))
                if template.endswith("/model"):
                    assert response.status_code == 409, response.text  # queued: no model yet, but it exists
                elif template.endswith("/layers/bn1"):
                    assert response.status_code == 404 and "no statistics" in response.json()["detail"]
                else:
                    assert response.status_code == 200, (template, response.text)


def test_listings_and_the_cluster_queue_show_only_your_jobs(server: LiveServer, jobs: dict[str, str]) -> None:
    seen = {}
    for name, token in (("alice", ALICE), ("bob", BOB), ("root", ROOT), ("default", BARE)):
        with server.client(token=token) as client:
            listing = client.get("/v1/jobs").json()
            queued = client.get("/v1/jobs", params={"status": "queued"}).json()
            cluster = client.get("/v1/cluster").json()
            assert listing["count"] == len(listing["data"]) == queued["count"] == cluster["queued_jobs"]
            seen[name] = {job["id"] for job in listing["data"]}
            assert all(job["owner"] == name for job in listing["data"]) or name == "root"
    assert jobs["alice"] in seen["alice"] and jobs["bob"] not in seen["alice"]
    assert jobs["bob"] in seen["bob"] and jobs["alice"] not in seen["bob"]
    assert seen["root"] >= seen["alice"] | seen["bob"], "an admin sees every principal's jobs"
    assert not seen["default"] & (seen["alice"] | seen["bob"])


def test_queue_position_counts_only_the_jobs_you_can_see(server: LiveServer, jobs: dict[str, str]) -> None:
    with server.client(token=ALICE) as alice:
        for index in range(2):  # alice's jobs queue ahead of the one bob submits next
            assert alice.post("/v1/jobs", json=tiny_spec(name=f"alice-ahead-{index}")).status_code == 201
    with server.client(token=BOB) as bob:
        mine = bob.post("/v1/jobs", json=tiny_spec(name="bob-behind")).json()
        own_queued = bob.get("/v1/jobs", params={"status": "queued"}).json()["count"]
        assert mine["queue_position"] == own_queued, "bob's place counts bob's queued jobs only"
        assert bob.get(f"/v1/jobs/{mine['id']}").json()["queue_position"] == own_queued
        listed = {job["id"]: job["queue_position"] for job in bob.get("/v1/jobs").json()["data"]}
        assert listed[mine["id"]] == own_queued
        assert sorted(listed.values()) == list(range(1, own_queued + 1))
    with server.client(token=ROOT) as root:
        everyone = root.get("/v1/jobs", params={"status": "queued"}).json()["count"]
        assert root.get(f"/v1/jobs/{mine['id']}").json()["queue_position"] == everyone > own_queued, (
            "an admin sees the whole queue, and bob's job is last in it"
        )


def test_idempotency_keys_are_per_principal(server: LiveServer) -> None:
    key = f"shared-key-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key}
    with server.client(token=ALICE) as alice, server.client(token=BOB) as bob:
        first = alice.post("/v1/jobs", json=tiny_spec(name="a"), headers=headers)
        other = bob.post("/v1/jobs", json=tiny_spec(name="b"), headers=headers)
        assert first.status_code == 201 and other.status_code == 201, "the same key of two principals: two jobs"
        assert first.json()["id"] != other.json()["id"]
        again = alice.post("/v1/jobs", json=tiny_spec(name="a"), headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        clash = bob.post("/v1/jobs", json=tiny_spec(name="c"), headers=headers)
        assert clash.status_code == 422 and other.json()["id"] in clash.json()["detail"]
        assert first.json()["id"] not in clash.json()["detail"], "bob's refusal never names alice's job"


def test_an_admin_manages_another_principals_job(server: LiveServer) -> None:
    with server.client(token=BOB) as bob, server.client(token=ROOT) as root:
        job = bob.post("/v1/jobs", json=tiny_spec(name="admin-cancels")).json()
        assert root.get(f"/v1/jobs/{job['id']}").json()["owner"] == "bob"
        assert root.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert root.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_whoami(server: LiveServer) -> None:
    expected = {
        ALICE: {"principal": "alice", "admin": False, "authenticated": True},
        ROOT: {"principal": "root", "admin": True, "authenticated": True},
        BARE: {"principal": "default", "admin": False, "authenticated": True},
    }
    for token, me in expected.items():
        with server.client(token=token) as client:
            assert client.get("/v1/whoami").json() == me
    with server.client() as anonymous:
        assert anonymous.get("/v1/whoami").status_code == 401


def test_token_entries_name_principals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCBN_API_TOKENS", f"alice={ALICE}, {BARE} ,padded-token-0123456789==")
    monkeypatch.setenv("SYNCBN_ADMINS", "alice")
    settings = Settings(data_dir=tmp_path)
    assert settings.principals() == [("alice", ALICE), ("default", BARE), ("default", "padded-token-0123456789==")]
    assert settings.admins == ["alice"]
    with pytest.raises(ValidationError, match="admins names 'carol', but api_tokens has no token for it"):
        Settings(data_dir=tmp_path, admins=["carol"])
    with pytest.raises(ValidationError, match="principal 'bob' uses a token listed before"):
        Settings(data_dir=tmp_path, api_tokens=[f"alice={ALICE}", f"bob={ALICE}"], admins=[])
    with pytest.raises(ValidationError, match="the token of principal 'bob' must be at least 16 characters"):
        Settings(data_dir=tmp_path, api_tokens=["bob=short"], admins=[])
