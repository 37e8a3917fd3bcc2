"""When Ray does not answer, the routes that need it say so with a 503 (and Retry-After) instead of a 500 or a
hang, the routes that only read the database keep working, and the service recovers by itself once Ray is back.

The real session Ray is shut down under a live server (not a mock), then started again for the tests after this
one (`ray_cluster`'s size, 4 CPUs).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import ray

from service.engine.cluster import ensure_ray
from service.jobs.manager import CAPACITY_TTL_S
from service.settings import Settings
from tests.service.conftest import RAY_TEST_CPUS
from tests.service.conftest_api import LiveServer, tiny_spec, wait_for

pytestmark = pytest.mark.timeout(180)


def test_routes_that_need_ray_answer_503_while_it_is_down_and_recover(ray_cluster: dict, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_concurrent_jobs=0)
    with LiveServer(settings) as server, server.client() as client:
        assert client.post("/v1/jobs", json=tiny_spec()).status_code == 201
        ray.shutdown()
        try:
            cluster = client.get("/v1/cluster")
            assert cluster.status_code == 503, cluster.text
            assert cluster.headers["Retry-After"] == "5"
            assert "the Ray cluster did not report its resources" in cluster.json()["detail"], cluster.json()

            # Submissions use a capacity reading cached for CAPACITY_TTL_S, then ask Ray again and get no answer.
            def refused() -> httpx.Response | None:
                response = client.post("/v1/jobs", json=tiny_spec())
                assert response.status_code in (201, 503), response.text
                return response if response.status_code == 503 else None

            response = wait_for(refused, CAPACITY_TTL_S + 10, "a submission to be refused with 503", interval=0.5)
            assert response.headers["Retry-After"] == "5"
            assert "retry" in response.json()["detail"], response.json()

            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"] == "ok", ready.json()
            assert ready.json()["ray"] != "ok"
            listed = client.get("/v1/jobs")
            assert listed.status_code == 200 and listed.json()["count"] >= 1, "database routes keep working"
        finally:
            ensure_ray(None, num_cpus=RAY_TEST_CPUS, log_to_driver=False)

        assert client.get("/v1/cluster").json()["cpus"] == RAY_TEST_CPUS
        assert client.post("/v1/jobs", json=tiny_spec()).status_code == 201, "back without restarting the service"
        assert client.get("/readyz").status_code == 200
