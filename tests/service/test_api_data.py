"""Streamed data through the real service: a Parquet data set made from the digits trains to the end; locations
outside the data root or with a scheme the operator did not allow are a 422 naming the field; a job whose data
turns out unusable (a missing column, an undecodable image, a missing folder) fails with a message naming the
column, file or folder, and the service stays up.

A real uvicorn server on a free loopback port, a real local Ray, an SQLite file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest_api import LiveServer, tiny_spec, wait_for
from tests.service.digits_files import write_digits_folder, write_digits_parquet

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("api-data")
    root = data_dir / "datasets"
    write_digits_parquet(root / "digits_parquet", files=2)
    write_digits_folder(root / "broken_images", count=30)
    (root / "broken_images" / "digit_1" / "broken.png").write_bytes(b"not a png at all")
    outside = tmp_path_factory.mktemp("outside")
    write_digits_folder(outside / "secret", count=10)
    os.symlink(outside / "secret", root / "escape")
    settings = Settings(data_dir=data_dir, data_root=root, max_concurrent_jobs=1, cancel_wait_s=30)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _images(**dataset: Any) -> dict[str, Any]:
    fields = {"kind": "image_folder", "image_size": [8, 8], "channels": 1, **dataset}
    return tiny_spec(model="cnn", dataset=fields, steps_per_epoch=None, epochs=1)


def _finished(client: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"job {job_id} to finish", interval=0.5)


@pytest.mark.parametrize(
    ("dataset", "phrases"),
    [
        ({"uri": "../elsewhere"}, ["dataset.uri", "'..'"]),
        ({"uri": "/etc"}, ["dataset.uri", "relative to the data root"]),
        ({"uri": "escape"}, ["dataset.uri 'escape' resolves to", "outside the data root"]),
        ({"uri": "s3://bucket/digits"}, ["dataset.uri uses s3://", "does not allow"]),
        ({"uri": "http://example.com/digits"}, ["dataset.uri uses the scheme 'http'"]),
        ({"uri": "digits", "val_uri": "escape/x"}, ["dataset.val_uri 'escape/x' resolves to"]),
        ({"uri": "digits", "image_size": None}, ["dataset.image_size is required"]),
    ],
)
def test_bad_locations_are_a_422_naming_the_field(client: httpx.Client, dataset: dict, phrases: list[str]) -> None:
    response = client.post("/v1/jobs", json=_images(**dataset))
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    for phrase in phrases:
        assert phrase in detail, detail


def test_a_parquet_job_trains_to_the_end(client: httpx.Client) -> None:
    spec = tiny_spec(
        model="cnn",
        dataset={"kind": "parquet", "uri": "digits_parquet", "image_size": [8, 8], "channels": 1},
        steps_per_epoch=None,
        epochs=2,
        batch_size=32,
        stats_every=10,
    )
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = _finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["summary"]["last_val_acc"] > 0.8, job["summary"]


@pytest.mark.parametrize(
    ("dataset", "phrase"),
    [
        ({"kind": "parquet", "uri": "digits_parquet", "label_column": "digit"}, "dataset.label_column 'digit'"),
        ({"uri": "broken_images"}, "broken.png"),
        ({"uri": "no_such_folder"}, "dataset.uri 'no_such_folder' does not exist"),
    ],
)
def test_unusable_data_fails_the_job_naming_the_column_or_file(
    client: httpx.Client, dataset: dict, phrase: str
) -> None:
    response = client.post("/v1/jobs", json=_images(**dataset))
    assert response.status_code == 201, response.text
    job = _finished(client, response.json()["id"])
    assert job["status"] == "failed" and phrase in (job["error"] or ""), job
    assert client.get("/healthz").status_code == 200
