"""The service on the real PostgreSQL server: a real digits job's records (step and epoch points, merged layer
statistics, logs, events) are stored as they arrive and read back identically by a restarted service; and what
PostgreSQL cannot store or compare (text with NUL characters, integers beyond its 32-bit INTEGER columns) is a 422
naming the field on every route of the OpenAPI document, never a 500 (checked on SQLite too, which would store
it: the API answers the same on both).

A fresh, uniquely named database per module (dropped afterwards); skipped with a reason when PostgreSQL is not
reachable at 127.0.0.1:5432.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest_api import LiveServer, read_events, tiny_spec

pytestmark = pytest.mark.timeout(300)


def test_a_job_on_postgres_is_fully_readable_after_a_restart(
    ray_cluster: dict, postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    with LiveServer(settings) as server, server.client() as client:
        job_id = client.post("/v1/jobs", json=tiny_spec(model="mlp", seed=5)).json()["id"]
        events = read_events(client, job_id)
        assert events[-2]["data"]["status"] == "succeeded", events[-4:]
        before = {
            path: client.get(path).json()
            for path in (
                f"/v1/jobs/{job_id}",
                f"/v1/jobs/{job_id}/metrics",
                f"/v1/jobs/{job_id}/layers",
                f"/v1/jobs/{job_id}/logs",
            )
        }
        layers = before[f"/v1/jobs/{job_id}/layers"]["layers"]
        assert layers and all(stats["ranks"] == 2 for stats in layers.values()), "BatchNorm1d layers merged"
        model = client.get(f"/v1/jobs/{job_id}/model").content

    with LiveServer(settings) as server, server.client() as client:
        for path, body in before.items():
            assert client.get(path).json() == body, path
        assert read_events(client, job_id) == events
        assert client.get(f"/v1/jobs/{job_id}/model").content == model


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def paused_server(
    request: pytest.FixtureRequest, ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, str]]:
    """A server that never starts a job (scheduling paused), and the id of one cancelled job in its database."""
    database_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    settings = Settings(data_dir=tmp_path_factory.mktemp("edges"), database_url=database_url, max_concurrent_jobs=0)
    with LiveServer(settings) as server, server.client() as client:
        job_id = client.post("/v1/jobs", json=tiny_spec()).json()["id"]
        # Cancelled, so that an event stream read past its end returns at once instead of waiting for news.
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        yield server, job_id


#: The study id that path templates get (no such study: a well-formed id answers 404, a NUL in it 422).
NO_STUDY = "nosuchstudy"


def _integer_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") == "integer":
            return option
    return None


def _operations(server: LiveServer, job_id: str) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(method, concrete path, parameters) of every operation under /v1, path parameters filled in."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    for template, operations in document["paths"].items():
        if not template.startswith("/v1/"):
            continue
        path = template.replace("{job_id}", job_id).replace("{layer}", "net.1").replace("{study_id}", NO_STUDY)
        for method, operation in operations.items():
            yield method.upper(), path, operation.get("parameters", [])


def test_every_integer_parameter_is_bounded_by_what_its_column_holds(paused_server: tuple[LiveServer, str]) -> None:
    server, job_id = paused_server
    checked = []
    with server.client(timeout=30) as client:
        for method, path, parameters in _operations(server, job_id):
            for parameter in parameters:
                schema = _integer_schema(parameter["schema"])
                if schema is None:
                    continue
                assert "maximum" in schema and "minimum" in schema, f"{method} {path}: {parameter['name']} unbounded"
                place = "headers" if parameter["in"] == "header" else "params"
                for value, expect_422 in ((schema["maximum"], False), (schema["maximum"] + 1, True)):
                    response = client.request(method, path, **{place: {parameter["name"]: str(value)}})
                    where = f"{method} {path} {parameter['name']}={value}"
                    assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
                    if expect_422:
                        assert response.status_code == 422, f"{where}: {response.status_code}"
                        assert parameter["name"] in response.json()["detail"], response.json()
                checked.append(f"{method} {path} {parameter['name']}")
    assert len(checked) >= 9, checked  # offset, limit x3, since_step x2, step, after x2, Last-Event-ID


def test_text_the_database_cannot_store_is_a_422_naming_the_field(paused_server: tuple[LiveServer, str]) -> None:
    server, job_id = paused_server
    checked = []
    with server.client(timeout=30) as client:
        stored = client.get("/v1/jobs").json()["count"]
        for method, path, parameters in _operations(server, job_id):
            for parameter in parameters:
                if parameter["in"] not in ("path", "query") or "string" not in str(parameter["schema"]):
                    continue
                name = parameter["name"]
                if parameter["in"] == "path":
                    filled = {"job_id": job_id, "study_id": NO_STUDY}.get(name, "net.1")
                    target, query = path.replace(filled, "a%00b"), {}
                else:
                    target, query = path, {name: "a\x00b"}
                response = client.request(method, target, params=query)
                where = f"{method} {target} {name}"
                assert response.status_code == 422, f"{where}: {response.status_code} {response.text}"
                assert f"parameter {name!r}" in response.json()["detail"] and "NUL" in response.json()["detail"]
                checked.append(where)
        for field, spec in (
            ("name", tiny_spec(name="nul\x00here")),
            ("dataset.path", tiny_spec(dataset={"kind": "npz", "path": "a\x00.npz"})),
        ):
            response = client.post("/v1/jobs", json=spec)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["detail"].startswith(f"{field} contains a NUL character"), response.json()
        # A JSON escape that decodes to half a surrogate pair cannot be encoded for any database either.
        response = client.post(
            "/v1/jobs", content=b'{"name": "half \\ud800 pair"}', headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422 and response.json()["detail"].startswith("name contains an unpaired")
        assert client.get("/v1/jobs").json()["count"] == stored, "nothing was stored"
    assert len(checked) >= 10, checked  # job_id on 9 routes, layer
