"""The service on the real PostgreSQL server: a real digits job's records (step and epoch points, merged layer
statistics, logs, events) are stored as they arrive and read back identically by a restarted service.

A fresh, uniquely named database per run (dropped afterwards); skipped with a reason when PostgreSQL is not
reachable at 127.0.0.1:5432.
"""

from __future__ import annotations

from pathlib import Path

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
